"""Comparisons of cross-validated results that do not claim more than five folds can show.

- Ours against a published mean ± std over n folds: Welch's t-test from summary statistics. Both
  sides are estimates; a one-sample t-test against the published mean would treat it as exact and
  give p-values that are too small. Approximate and conservative: their test parts are ours
  (metadata fold k), so the two sides share the folds' difficulty, and treating them as
  independent counts the fold-to-fold variance twice. With a paper's per-fold numbers the
  comparison is paired over the folds instead (`corrected_paired`); Levi & Hassner published none.
- Two of our variants on the same folds: the corrected resampled t-test (Nadeau & Bengio 2003,
  "Inference for the Generalization Error"). Training sets of k-fold CV overlap (five folds
  share 75 % of their training data), so fold differences are correlated and the paired t-test's
  variance is too small; the correction multiplies it by (1/k + n_test/n_train) instead of 1/k.
- Holm's step-down correction across every p-value printed in one summary.
- One fold's test accuracy: a user-clustered bootstrap interval, since a user's faces are not
  independent (a fold's test part can be 100 faces of 33 users).
Every difference comes with its 95 % confidence interval from the same t distribution; the
summary prints simultaneous (Bonferroni) intervals instead, at level 1 - 0.05 / m, because an
unadjusted interval can exclude 0 while the Holm-adjusted p is above 0.05 (`interval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

WELCH = "Welch's t-test from summary statistics (approximate)"
CORRECTED = "corrected resampled t-test (Nadeau & Bengio 2003), paired over folds"


@dataclass(frozen=True)
class Difference:
    """a - b, its confidence interval, and the two-sided test of a == b."""

    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float
    test: str
    se: float = float("nan")

    def as_dict(self) -> dict[str, float | str]:
        return dict(self.__dict__)


def _nan(diff: float, test: str) -> Difference:
    nan = float("nan")
    return Difference(diff, nan, nan, nan, nan, nan, test)


def _from_t(diff: float, se: float, df: float, level: float, test: str) -> Difference:
    if not (se > 0 and df > 0 and math.isfinite(se)):
        return _nan(diff, test)
    t = diff / se
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * stats.t.sf(abs(t), df))
    return Difference(diff, diff - half, diff + half, t, df, p, test, se)


def bonferroni_level(m: int, alpha: float = 0.05) -> float:
    """The simultaneous level over m tests: an interval at it excludes 0 only where p < alpha / m,
    hence only where the Holm-adjusted p (never above m * p) is below alpha too."""
    return 1 - alpha / max(m, 1)


def interval(d: Difference, level: float) -> tuple[float, float]:
    """d's interval at another level, from the same t distribution (NaN where undefined)."""
    if not (math.isfinite(d.se) and d.df > 0):
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, d.df)) * d.se
    return d.diff - half, d.diff + half


def welch(
    mean_a: float,
    sd_a: float,
    n_a: int,
    mean_b: float,
    sd_b: float,
    n_b: int,
    level: float = 0.95,
) -> Difference:
    """Welch's unequal-variance t-test and CI from means, sample stds and counts."""
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se = math.sqrt(va + vb)
    denom = (va**2 / (n_a - 1) if n_a > 1 else math.inf) + (vb**2 / (n_b - 1) if n_b > 1 else 0)
    df = (va + vb) ** 2 / denom if denom > 0 else 0.0
    return _from_t(mean_a - mean_b, se, df, level, WELCH)


def corrected_paired(
    a: Sequence[float], b: Sequence[float], test_train_ratio: float, level: float = 0.95
) -> Difference:
    """Nadeau & Bengio's corrected resampled t-test of paired per-fold results a, b.

    `test_train_ratio` is n_test / n_train of a fold (about 1 / (k - 1) for k-fold CV).
    """
    d = np.subtract(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    k = len(d)
    if k < 2:
        return _nan(float(d.mean()) if k else float("nan"), CORRECTED)
    var = float(np.var(d, ddof=1))
    se = math.sqrt((1 / k + test_train_ratio) * var)
    return _from_t(float(d.mean()), se, k - 1, level, CORRECTED)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order; NaN stays NaN and does not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), np.nan)
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        out[i] = running
    return [float(x) for x in out]


USER_BOOTSTRAP = "user-clustered percentile bootstrap (test users resampled with replacement)"
BOOTSTRAP_DRAWS = 2000


def user_bootstrap(
    hits: npt.ArrayLike,
    users: npt.ArrayLike,
    seed: int,
    b: int = BOOTSTRAP_DRAWS,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of an accuracy whose faces are clustered by user.

    Faces of one user share a face, a camera and an album, so they are not independent: the
    resampled unit is the user (all of a user's faces in or out together), B draws, seeded so a
    fold's interval is the same on every run.
    """
    ok = np.asarray(hits, dtype=np.float64)
    if len(ok) == 0:
        return float("nan"), float("nan")
    _, codes = np.unique(np.asarray(users), return_inverse=True)
    right, faces = np.bincount(codes, weights=ok), np.bincount(codes).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(faces), size=(b, len(faces)))
    acc = right[draws].sum(1) / faces[draws].sum(1)
    low, high = np.quantile(acc, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
