"""Classification metrics for the two heads: exact and 1-off accuracy, per-class, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.stats import user_bootstrap


def confusion(labels: npt.ArrayLike, preds: npt.ArrayLike, classes: int) -> npt.NDArray[np.int64]:
    """Rows are the true class, columns the prediction."""
    out = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(preds)), 1)
    return out


def head_metrics(
    probs: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.int64],
    prefix: str,
    users: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of one head on the rows that carry its label (labels < 0 are ignored).

    `age_1off` counts a prediction in the true or an adjacent group, as Levi & Hassner report;
    it is left out for a two-class age head (CelebA's young/old), where it would always be 1.
    With `users` (one per row), each accuracy gets its user-clustered bootstrap 95 % interval,
    `<metric>_ci_low` and `<metric>_ci_high`.
    """
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    classes = probs.shape[1]
    preds = probs.argmax(1)
    cm = confusion(labels, preds, classes)
    support = cm.sum(1)
    per_class = [float(cm[i, i] / support[i]) if support[i] else None for i in range(classes)]
    n = len(labels)
    out: dict[str, Any] = {
        f"{prefix}_acc": float((preds == labels).mean()) if n else None,
        f"{prefix}_n": n,
        f"{prefix}_per_class": per_class,
        f"{prefix}_confusion": cm.tolist(),
    }
    hits = {f"{prefix}_acc": preds == labels}
    if prefix == "age" and classes > 2:
        hits["age_1off"] = np.abs(preds - labels) <= 1
        out["age_1off"] = float(hits["age_1off"].mean()) if n else None
    if users is not None and n:
        kept = np.asarray(users)[keep]
        for key, hit in hits.items():
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = user_bootstrap(hit, kept, seed)
    return out


def sample_std(values: Sequence[float]) -> float:
    """The ± of cross-validation: sample std (ddof=1) across folds; NaN for fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def mean_accuracy(metrics: dict[str, Any]) -> float:
    """The mean of the available heads' accuracies (model selection for multi-task runs)."""
    accs = [metrics[k] for k in ("age_acc", "gender_acc") if metrics.get(k) is not None]
    return float(np.mean(accs)) if accs else float("nan")
