"""The figures are real PNGs with content, for the input shapes runs and suites actually produce."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender import plots
from agegender.labels import AGE_GROUPS


def assert_png(path: Path, min_width: int = 400) -> None:
    """A decodable PNG of reasonable size that is not one flat colour."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width >= min_width, image.size
        assert image.height >= 300, image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 5.0, f"{path}: nearly flat image (std {pixels.std():.2f})"
    assert not list(path.parent.glob(f".{path.name}.*.tmp")), "temporary file left behind"


def history(epochs: int, heads: tuple[str, ...], seed: int = 0) -> list[dict[str, Any]]:
    """Records shaped like train.py's history.json; the best val loss marks `best`."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    best = math.inf
    for e in range(1, epochs + 1):
        val_loss = 2.5 * math.exp(-e / 6) + 0.02 * (e - 8) ** 2 / 8 + 0.05 * rng.random()
        rec: dict[str, Any] = {
            "epoch": e,
            "lr": 1e-3 * 0.9**e,
            "train_loss": 2.6 * math.exp(-e / 5) + 0.1,
            "val_loss": val_loss,
            "images_per_s": 500.0,
            "iteration": 15 * e,
        }
        for head in heads:
            rec[f"train_{head}_acc"] = min(0.99, 0.2 + 0.05 * e)
            rec[f"val_{head}_acc"] = min(0.9, 0.15 + 0.04 * e + 0.02 * rng.random())
        if "age" in heads:
            rec["val_age_1off"] = min(0.98, rec["val_age_acc"] + 0.3)
        rec["best"] = val_loss < best
        best = min(best, val_loss)
        out.append(rec)
    return out


def test_learning_curves_multitask(tmp_path: Path) -> None:
    out = plots.learning_curves(
        history(30, ("age", "gender")), tmp_path / "deep" / "curves.png", "fold 0 multitask"
    )
    assert out == tmp_path / "deep" / "curves.png"
    assert_png(out)


def test_learning_curves_single_task_with_gaps(tmp_path: Path) -> None:
    hist = history(12, ("age",))
    for rec in hist[::3]:
        rec["val_age_acc"] = None  # e.g. no labelled rows in the val part
        rec["val_age_1off"] = None
    hist[4]["val_loss"] = None
    out = plots.learning_curves(hist, str(tmp_path / "age.png"), title="fold 3 age")
    assert isinstance(out, Path)
    assert_png(out)


def test_learning_curves_without_anything(tmp_path: Path) -> None:
    """An empty history (a run that died before its first epoch) still gives a figure."""
    path = plots.learning_curves([], tmp_path / "empty.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 400


def test_learning_curves_from_threads(tmp_path: Path) -> None:
    """Folds plot concurrently in threads; the figures must not bleed into each other."""
    jobs = [(history(20, ("age", "gender"), seed=k), tmp_path / f"fold{k}.png") for k in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda job: plots.learning_curves(job[0], job[1], job[1].stem), jobs))
    assert done == [p for _, p in jobs]
    for path in done:
        assert_png(path)


def test_confusion_matrix_with_empty_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 40, size=(8, 8)) + np.diag(rng.integers(50, 400, size=8))
    cm[2] = 0  # a class absent from this fold's test part
    out = plots.confusion_matrix(cm.tolist(), AGE_GROUPS, tmp_path / "cm_age.png", "fold 1 age")
    assert_png(out)
    gender = plots.confusion_matrix([[900, 120], [80, 1000]], ["m", "f"], tmp_path / "cm_g.png")
    assert_png(gender)


def test_confusion_matrix_rejects_mismatched_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        plots.confusion_matrix([[1, 2], [3, 4]], AGE_GROUPS, tmp_path / "bad.png")


def test_fold_bars_with_missing_value(tmp_path: Path) -> None:
    values: dict[str, list[float | None]] = {
        "test_age_acc": [0.51, 0.48, None, 0.55, 0.49],
        "test_age_1off": [0.84, 0.86, 0.83, 0.88, 0.85],
        "test_gender_acc": [0.86, 0.88, 0.85, 0.87, 0.95],
    }
    out = plots.fold_bars(values, tmp_path / "folds.png", "multitask, 5 folds")
    assert_png(out)


def test_compare_bars_with_missing_metric(tmp_path: Path) -> None:
    groups = {
        "multitask": {
            "age_acc": (0.50, 0.03),
            "age_1off": (0.85, 0.02),
            "gender_acc": (0.86, 0.01),
        },
        "age": {"age_acc": (0.49, 0.04), "age_1off": (0.84, 0.02)},
        "gender": {"gender_acc": (0.87, 0.015)},
        "Levi-Hassner 2015": {"age_acc": (0.507, 0.051), "age_1off": (0.847, 0.022)},
    }
    out = plots.compare_bars(groups, tmp_path / "suite" / "compare.png", "suite summary")
    assert_png(out)


def test_bars_outside_unit_interval(tmp_path: Path) -> None:
    """Throughput-like metrics get a free y axis; tiny bars still show their value."""
    folds = plots.fold_bars(
        {"images_per_s": [510.0, 495.0, 530.0, None, 502.0], "test_age_acc": [None] * 5},
        tmp_path / "speed.png",
    )
    assert_png(folds)
    compare = plots.compare_bars(
        {"a": {"loss": (2.1, 0.1), "gap": (0.05, float("nan"))}, "b": {"loss": (1.7, 0.2)}},
        tmp_path / "loss.png",
    )
    assert_png(compare)
