"""The statistics of the summary tables, against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from agegender.stats import (
    bonferroni_level,
    corrected_paired,
    holm,
    interval,
    user_bootstrap,
    welch,
)


def test_welch_against_hand_computed_values() -> None:
    # ours 48.0 ± 4.0 (n 5) vs Levi & Hassner 50.7 ± 5.1 (n 5), in points:
    # se = sqrt(16/5 + 26.01/5) = sqrt(8.402) = 2.89862
    # t = -2.7 / 2.89862 = -0.93148
    # df = 8.402^2 / ((3.2^2 + 5.202^2) / 4) = 70.5936 / 9.32530 = 7.57020
    d = welch(48.0, 4.0, 5, 50.7, 5.1, 5)
    assert d.diff == pytest.approx(-2.7)
    assert d.t == pytest.approx(-0.93148, abs=1e-5)
    assert d.df == pytest.approx(7.57020, abs=1e-5)
    # p and the CI from the t distribution with those df; scipy's own Welch agrees
    assert d.p == pytest.approx(2 * sps.t.sf(0.93148, 7.57020), abs=1e-5)
    ref = sps.ttest_ind_from_stats(48.0, 4.0, 5, 50.7, 5.1, 5, equal_var=False)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
    half = sps.t.ppf(0.975, 7.57020) * 2.89862
    assert (d.low, d.high) == pytest.approx((-2.7 - half, -2.7 + half), abs=1e-4)
    assert 0.3 < d.p < 0.45  # not significant: five folds a side with these stds


def test_welch_is_more_conservative_than_a_one_sample_test() -> None:
    """The old test treated the published mean as exact: smaller p for the same numbers."""
    folds = [0.43, 0.48, 0.52, 0.45, 0.50]
    m, s = float(np.mean(folds)), float(np.std(folds, ddof=1))
    one_sample = sps.ttest_1samp(folds, 0.507).pvalue
    assert welch(m, s, 5, 0.507, 0.051, 5).p > one_sample


def test_corrected_resampled_t_against_hand_computed_values() -> None:
    a = [0.52, 0.48, 0.55, 0.50, 0.45]
    b = [0.50, 0.47, 0.51, 0.49, 0.46]
    # d = [.02, .01, .04, .01, -.01]: mean 0.014, var (ddof 1) = 1.32e-3 / 4 = 3.3e-4
    # corrected se = sqrt((1/5 + 0.25) * 3.3e-4) = sqrt(1.485e-4) = 0.0121861
    # t = 0.014 / 0.0121861 = 1.14885, df = 4
    d = corrected_paired(a, b, test_train_ratio=0.25)
    assert d.diff == pytest.approx(0.014)
    assert d.t == pytest.approx(1.14885, abs=1e-5)
    assert d.df == 4
    assert d.p == pytest.approx(2 * sps.t.sf(1.14885, 4), abs=1e-5)
    half = sps.t.ppf(0.975, 4) * 0.0121861
    assert (d.low, d.high) == pytest.approx((0.014 - half, 0.014 + half), abs=1e-6)
    # with no correction (ratio 0) it is the ordinary paired t-test, whose p is smaller
    plain = corrected_paired(a, b, test_train_ratio=0.0)
    assert plain.p == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
    assert plain.p < d.p


def test_undefined_cases_are_nan_not_errors() -> None:
    assert math.isnan(corrected_paired([0.5], [0.4], 0.25).p)
    assert math.isnan(corrected_paired([0.5, 0.6], [0.4, 0.5], 0.25).p)  # no variance
    assert math.isnan(welch(0.5, 0.0, 5, 0.5, 0.0, 5).p)


def test_holm_by_hand() -> None:
    # sorted 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, float("nan"), 0.6])  # NaN is kept and not counted: m = 2
    assert out[0] == pytest.approx(0.4)
    assert math.isnan(out[1])
    assert out[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1; monotone


def test_simultaneous_interval_by_hand() -> None:
    """The corrected-t example above (mean 0.014, se 0.0121861, df 4) at the Bonferroni level
    over 3 tests, 1 - 0.05 / 3: half-width t(1 - 0.05 / 6, 4) x se; at 0.95 it is the 95 % CI."""
    d = corrected_paired([0.52, 0.48, 0.55, 0.50, 0.45], [0.50, 0.47, 0.51, 0.49, 0.46], 0.25)
    assert bonferroni_level(3) == pytest.approx(0.983333, abs=1e-6)
    half = sps.t.ppf(1 - 0.05 / 6, 4) * 0.0121861
    assert interval(d, bonferroni_level(3)) == pytest.approx((0.014 - half, 0.014 + half), abs=1e-6)
    assert interval(d, 0.95) == pytest.approx((d.low, d.high))
    assert all(math.isnan(x) for x in interval(corrected_paired([0.5], [0.4], 0.25), 0.99))


def test_user_bootstrap_resamples_users_not_faces() -> None:
    """Three users, each one face right and one wrong: every resample of users scores exactly
    0.5, so the clustered interval is [0.5, 0.5] (a face-level bootstrap of the same six faces
    would spread from about 0.17 to 0.83)."""
    hits = [1, 0, 1, 0, 0, 1]
    users = ["a", "a", "b", "b", "c", "c"]
    assert user_bootstrap(hits, users, seed=0) == (0.5, 0.5)
    # one user all right, one all wrong: resamples give 0, 0.5 or 1 (1/4, 1/2, 1/4), so the
    # 2.5 % and 97.5 % points are 0 and 1; accuracy pools faces, not user means
    assert user_bootstrap([1, 1, 1, 0], ["a", "a", "a", "b"], seed=3) == (0.0, 1.0)
    # seeded: the same fold gives the same interval, around its accuracy (14 of 40 = 0.35)
    many = np.arange(40) % 3 == 0
    who = [f"u{i // 2}" for i in range(40)]
    assert user_bootstrap(many, who, seed=1) == user_bootstrap(many, who, seed=1) == (0.25, 0.45)
    assert all(math.isnan(x) for x in user_bootstrap([], [], seed=0))
