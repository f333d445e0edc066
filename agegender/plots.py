"""PNG figures for runs and suites: learning curves, confusion matrices, per-fold and variant bars.

Numbers in JSON are hard to eyeball; these figures are logged next to them as artifacts. Only the
object-oriented matplotlib API is used (a `Figure` per call, never pyplot), because several folds
may plot at once in threads and pyplot's global figure registry is not thread-safe. Plotting is a
side product of a run, so empty inputs give a "no data" figure instead of an exception; only
inputs that cannot be right (a non-square confusion matrix, mismatched labels) raise.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agegender.metrics import sample_std

DPI = 120
"""Resolution of every PNG written here."""

FloatArray = npt.NDArray[np.float64]

# (history key, legend label, colour, line style) of the accuracy panel, in legend order.
_ACC_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("val_age_acc", "val age exact", "C0", "-"),
    ("val_age_1off", "val age 1-off", "C2", "-"),
    ("val_gender_acc", "val gender", "C3", "-"),
    ("train_age_acc", "train age exact", "C0", "--"),
    ("train_gender_acc", "train gender", "C3", "--"),
)
_LOSS_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("train_loss", "train loss", "C1", "--"),
    ("val_loss", "val loss", "C1", "-"),
)


def _num(value: Any) -> float:
    """Missing, None or non-finite values become NaN, which matplotlib leaves as a gap."""
    if value is None or isinstance(value, str):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _save(fig: Figure, path: Path | str) -> Path:
    """Write atomically (readers such as an artifact upload never see half a PNG), then free."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return out


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(fig: Figure, title: str) -> None:
    if title:
        fig.suptitle(title)


def learning_curves(
    history: Sequence[Mapping[str, Any]], path: Path | str, title: str = ""
) -> Path:
    """Loss and accuracy per epoch, to judge over-fitting and whether model selection was sane.

    Task keys absent from every record (single-task runs) are simply not drawn; None values leave
    gaps. The selected epoch is the last record with `best` true, as in training.
    """
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_acc = fig.add_subplot(1, 2, 2)
    _title(fig, title)
    n = len(history)
    epochs = np.array(
        [i + 1.0 if h.get("epoch") is None else _num(h["epoch"]) for i, h in enumerate(history)],
        dtype=np.float64,
    )
    # Markers keep a lone value between None gaps visible.
    style: dict[str, Any] = {"marker": "o", "markersize": 3 if n <= 40 else 1.5}
    chosen = [i for i, h in enumerate(history) if h.get("best")]
    selected = float(epochs[chosen[-1]]) if chosen else math.nan

    def draw(ax: Axes, series: tuple[tuple[str, str, str, str], ...]) -> bool:
        drawn = False
        for key, label, colour, line in series:
            y = np.array([_num(h.get(key)) for h in history], dtype=np.float64)
            if not np.isfinite(y).any():
                continue
            ax.plot(epochs, y, line, color=colour, label=label, **style)
            drawn = True
        return drawn

    for ax, series, ylabel in (
        (ax_loss, _LOSS_SERIES, "loss"),
        (ax_acc, _ACC_SERIES, "accuracy"),
    ):
        if not draw(ax, series):
            _no_data(ax, f"no {ylabel} recorded")
            continue
        if math.isfinite(selected):
            ax.axvline(selected, color="0.35", linestyle=":", linewidth=1.2, label="selected (val)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if ax_acc.has_data():
        ax_acc.set_ylim(0.0, 1.0)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    return _save(fig, path)


def confusion_matrix(
    cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path | str, title: str = ""
) -> Path:
    """Which classes are confused with which; colour is the row fraction so rare classes show.

    Rows are the true class, columns the prediction; each cell is annotated with its count.
    Rows without support stay at 0 (no colour).
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    if counts.ndim != 2 or counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {k} labels")
    support = counts.sum(axis=1, keepdims=True)
    frac = np.divide(
        counts, support, out=np.zeros(counts.shape, dtype=np.float64), where=support > 0
    )
    side = max(4.2, 0.62 * k + 2.4)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    _title(fig, title)
    if k == 0:
        _no_data(ax)
        return _save(fig, path)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of true class", shrink=0.85)
    size = 9 if k <= 10 else 7
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=size,
                color="white" if frac[i, j] > 0.55 else "black",
            )
    ticks = np.arange(k)
    ax.set_xticks(ticks, [str(x) for x in labels])
    ax.set_yticks(ticks, [str(x) for x in labels])
    if k > 4:
        ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def _unit_interval(values: FloatArray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size) and bool(((finite >= 0.0) & (finite <= 1.0)).all())


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _metric_ticks(ax: Axes, names: Sequence[str]) -> None:
    """One tick per metric group; the limits keep a group of missing bars on the axis."""
    ax.set_xticks(np.arange(len(names)), list(names))
    ax.set_xlim(-0.5, len(names) - 0.5)
    if len(names) > 3 or max((len(x) for x in names), default=0) > 16:
        ax.tick_params(axis="x", labelrotation=20)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")


def fold_bars(
    values: Mapping[str, Sequence[float | None]], path: Path | str, title: str = ""
) -> Path:
    """Per-fold test metrics with mean ± sample std, to see the spread the CV summary hides.

    One group per metric, one bar per fold (fold i is the i-th value; None leaves no bar); the
    mean of the present values is a horizontal segment with a ± std (ddof=1) error bar.
    """
    names = list(values)
    folds = max((len(v) for v in values.values()), default=0)
    table = np.full((len(names), folds), np.nan, dtype=np.float64)
    for i, name in enumerate(names):
        for j, v in enumerate(values[name]):
            table[i, j] = _num(v)
    fig = Figure(
        figsize=(max(6.5, 1.6 + 1.5 * len(names) * max(1.0, folds / 5)), 4.8), layout="constrained"
    )
    ax = fig.add_subplot(1, 1, 1)
    _title(fig, title)
    if not names or not np.isfinite(table).any():
        _no_data(ax)
        return _save(fig, path)
    unit = _unit_interval(table)
    group = 0.8
    width = group / folds
    x = np.arange(len(names), dtype=np.float64)
    for j in range(folds):
        offset = -group / 2 + (j + 0.5) * width
        ax.bar(
            x + offset, table[:, j], width * 0.92, color=f"C{j % 10}", alpha=0.75, label=f"fold {j}"
        )
        partial = np.isfinite(table).any(axis=1) & ~np.isfinite(table[:, j])
        for gap in np.flatnonzero(partial):
            ax.annotate(
                "n/a",
                (x[gap] + offset, 0.0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                rotation=90,
                fontsize=7,
                color="0.4",
            )
    labelled = False
    highest = float(np.nanmax(table))
    for i in range(len(names)):
        present = table[i][np.isfinite(table[i])]
        if not present.size:
            ax.text(
                x[i],
                0.5,
                "no values",
                ha="center",
                va="center",
                color="0.4",
                transform=ax.get_xaxis_transform(),
            )
            continue
        mean = float(present.mean())
        std = sample_std(present.tolist())
        ax.hlines(
            mean,
            x[i] - group / 2,
            x[i] + group / 2,
            colors="black",
            linewidth=2,
            label="_nolegend_" if labelled else "mean ± std",
        )
        labelled = True
        if math.isfinite(std):
            ax.errorbar(x[i], mean, yerr=std, color="black", capsize=6, linewidth=1.5)
        text = f"{_fmt(mean)} ± {_fmt(std)}" if math.isfinite(std) else _fmt(mean)
        spread = std if math.isfinite(std) else 0.0
        high = unit and mean + spread > 0.9  # keep the label inside a 0..1 axis: put it below
        highest = max(highest, mean + spread)
        ax.annotate(
            text,
            (x[i], mean - spread if high else mean + spread),
            xytext=(0, -5 if high else 4),
            textcoords="offset points",
            ha="center",
            va="top" if high else "bottom",
            fontsize=9,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.85, "linewidth": 0},
        )
    _metric_ticks(ax, names)
    if unit:
        ax.set_ylim(0.0, 1.0)
    elif highest > 0:
        ax.set_ylim(top=highest * 1.15)  # room for the mean labels
    ax.set_ylabel("value")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(fig, path)


def compare_bars(
    groups: Mapping[str, Mapping[str, tuple[float, float]]], path: Path | str, title: str = ""
) -> Path:
    """Mean ± std of each variant per metric, so the suite's variants (and any published
    reference) are compared at a glance. A metric missing from a variant is just not drawn.
    """
    variants = list(groups)
    names: list[str] = []
    for metrics in groups.values():
        names.extend(m for m in metrics if m not in names)
    means = np.full((len(variants), len(names)), np.nan, dtype=np.float64)
    stds = np.full_like(means, np.nan)
    for i, variant in enumerate(variants):
        for metric, pair in groups[variant].items():
            mean, std = pair
            j = names.index(metric)
            means[i, j], stds[i, j] = _num(mean), _num(std)
    per_group = max(len(variants), 1)
    fig = Figure(
        figsize=(max(6.5, 2.4 + len(names) * (0.5 + 0.32 * per_group)), 4.8),
        layout="constrained",
    )
    ax = fig.add_subplot(1, 1, 1)
    _title(fig, title)
    if not names or not np.isfinite(means).any():
        _no_data(ax)
        return _save(fig, path)
    unit = _unit_interval(means)
    errs = np.where(np.isfinite(stds), stds, 0.0)
    top = 1.0 if unit else float(np.nanmax(means + errs)) * 1.12
    group = 0.8
    width = group / per_group
    x = np.arange(len(names), dtype=np.float64)
    for i, variant in enumerate(variants):
        offset = -group / 2 + (i + 0.5) * width
        err = errs[i]
        ax.bar(
            x + offset,
            means[i],
            width * 0.92,
            yerr=err,
            capsize=3,
            color=f"C{i % 10}",
            label=variant,
            error_kw={"elinewidth": 1},
        )
        for col in np.flatnonzero(np.isfinite(means[i])):
            m = float(means[i, col])
            inside = m >= 0.2 * top  # tall bars carry their value inside, short ones above
            ax.annotate(
                _fmt(m),
                (x[col] + offset, m / 2 if inside else m + float(err[col])),
                xytext=(0, 0 if inside else 3),
                textcoords="offset points",
                ha="center",
                va="center" if inside else "bottom",
                rotation=90,
                fontsize=7,
                color="white" if inside else "black",
            )
    _metric_ticks(ax, names)
    if unit:
        ax.set_ylim(0.0, 1.0)
    elif top > 0:
        ax.set_ylim(top=top)
    ax.set_ylabel("mean ± std")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(fig, path)
