from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agegender.cache import open_cache
from agegender.config import load_config
from agegender.splits import make_split
from agegender.train import RunError, prepare_run, train_epoch, train_fold
from tests.conftest import REPO, run_cli

# Small and quick on a CPU: 48 px crops of 56 px images, batch norm, Adam with a cosine decay.
SMALL = [
    "data.crop=48",
    "optim.name=adam",
    "optim.lr=0.0005",
    "optim.weight_decay=0",
    "optim.schedule=cosine",
    "model.norm=batchnorm",
    "train.patience=null",
]
SPEED = {"images_per_s"}  # the only history fields allowed to differ between equal runs


def _majority(confusion: list[list[int]]) -> float:
    support = np.array(confusion).sum(1)
    return float(support.max() / support.sum())


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in h.items() if k not in SPEED}
        for h in json.loads((run_dir / "history.json").read_text())
    ]


@pytest.mark.integration
def test_learns_from_pixels_not_from_leakage(learn_cache: Path, tmp_path: Path) -> None:
    """The real model beats a control trained on permuted labels, which stays near majority."""
    config = load_config(None, [*SMALL, "train.epochs=15"])
    real = train_fold(learn_cache, 0, config, tmp_path / "real").summary
    control_cfg = load_config(None, [*SMALL, "train.epochs=15", "data.shuffle_labels=true"])
    control = train_fold(learn_cache, 0, control_cfg, tmp_path / "control").summary
    t, c = real["test"], control["test"]
    age_major, gender_major = _majority(t["age_confusion"]), _majority(t["gender_confusion"])
    # Measured (seed 0): real age 0.41, gender 0.77; control age 0.12, gender 0.50;
    # majority age ~0.15, gender ~0.52 on this test fold.
    assert t["age_acc"] >= c["age_acc"] + 0.15
    assert t["gender_acc"] >= c["gender_acc"] + 0.12
    assert t["age_acc"] >= age_major + 0.12
    assert t["age_1off"] > t["age_acc"]
    assert c["age_acc"] <= age_major + 0.08
    assert c["gender_acc"] <= gender_major + 0.08
    # Selection used validation only: the chosen epoch is the one with the lowest val loss.
    history = json.loads((tmp_path / "real" / "history.json").read_text())
    assert real["best_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert not any(k.startswith("test") for h in history for k in h)


def test_same_seed_same_metrics(learn_cache: Path, tmp_path: Path) -> None:
    config = load_config(None, [*SMALL, "train.iterations=12", "train.tencrop=false"])
    a = train_fold(learn_cache, 3, config, tmp_path / "a")
    b = train_fold(learn_cache, 3, config, tmp_path / "b")
    assert a.test == b.test
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    train_fold(
        learn_cache,
        3,
        load_config(None, [*SMALL, "train.iterations=12", "train.tencrop=false", "train.seed=1"]),
        tmp_path / "c",
    )
    assert _history(tmp_path / "c") != _history(tmp_path / "a")
    assert (tmp_path / "a" / "test_predictions.csv").read_text().count("\n") == a.summary["sizes"][
        "test"
    ] + 1


def test_early_stopping_and_run_dir_safety(learn_cache: Path, tmp_path: Path) -> None:
    # With a vanishing learning rate nothing improves after epoch 1: patience 2 stops at 3.
    config = load_config(
        None,
        [
            *SMALL,
            "optim.lr=1e-12",
            "train.epochs=10",
            "train.patience=2",
            "train.tencrop=false",
            "train.select_metric=mean_acc",
        ],
    )
    res = train_fold(learn_cache, 1, config, tmp_path / "run")
    assert (res.summary["epochs"], res.summary["best_epoch"], res.summary["stopped_early"]) == (
        3,
        1,
        True,
    )
    with pytest.raises(RunError, match="already holds a run"):
        train_fold(learn_cache, 1, config, tmp_path / "run")
    other = load_config(None, [*SMALL, "train.epochs=2"])
    with pytest.raises(RunError, match="another run's checkpoint"):
        train_fold(learn_cache, 1, other, tmp_path / "run", resume=True)


def test_normalisation_comes_from_training_images_only(learn_cache: Path, tmp_path: Path) -> None:
    config = load_config(
        None, [*SMALL, "train.iterations=1", "train.tencrop=false", "data.norm_images=100000"]
    )
    res = train_fold(learn_cache, 2, config, tmp_path / "run")
    cache = open_cache(learn_cache)
    split = make_split(cache.table, 2)
    train_px = cache.images[np.unique(cache.slots[split.train.rows])].reshape(-1, 3)
    np.testing.assert_allclose(res.summary["normalize"]["mean"], train_px.mean(0), rtol=1e-5)
    every_px = cache.images[np.unique(cache.slots)].reshape(-1, 3)
    assert not np.allclose(res.summary["normalize"]["mean"], every_px.mean(0), rtol=1e-5)


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_result(learn_cache: Path, tmp_path: Path) -> None:
    args: list[str | Path] = ["--cache", learn_cache, "--fold", "4", *SMALL, "train.epochs=6"]
    script = Path(sys.executable).with_name("agegender")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(script), "train-fold", *map(str, args), "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        history = killed / "history.json"
        if history.exists() and len(json.loads(history.read_text())) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    epochs_before = len(json.loads((killed / "history.json").read_text()))
    assert 2 <= epochs_before < 6

    resumed = run_cli("train-fold", *args, "--out", killed, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli("train-fold", *args, "--out", tmp_path / "straight", "--json")
    assert straight.returncode == 0, straight.stderr
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    for key in (
        "age_acc",
        "age_1off",
        "gender_acc",
        "age_acc_10crop",
        "age_1off_10crop",
        "gender_acc_10crop",
    ):
        assert isinstance(a["test"][key], float), key
    assert a["test"] == b["test"]
    assert _history(killed) == _history(tmp_path / "straight")


def test_backbone_transfer(learn_cache: Path, tmp_path: Path) -> None:
    source = train_fold(
        learn_cache,
        0,
        load_config(None, [*SMALL, "train.iterations=2", "train.tencrop=false"]),
        tmp_path / "source",
    )
    checkpoint = torch.load(source.out_dir / "best.pt", weights_only=False)["model"]
    config = load_config(None, [*SMALL, f"model.init_from={source.out_dir / 'best.pt'}"])
    run = prepare_run(open_cache(learn_cache), 1, config)
    for name, value in run.model.state_dict().items():
        if name.startswith("heads."):
            assert not torch.equal(value, checkpoint[name]), name  # fresh heads
        else:
            assert torch.equal(value, checkpoint[name]), name  # the backbone is the checkpoint's
    # Fine-tuning as the seed did: conv1-3 frozen (batch-norm statistics included), the rest at a
    # lower learning rate for the backbone.
    tune = load_config(
        None,
        [
            *SMALL,
            f"model.init_from={source.out_dir / 'best.pt'}",
            "model.freeze=conv",
            "optim.backbone_lr=0.1",
            "train.iterations=3",
        ],
    )
    run = prepare_run(open_cache(learn_cache), 1, tune)
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([5e-4, 5e-5])
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_epoch(run)
    after = run.model.state_dict()
    assert run.iteration == 3
    for name, value in after.items():
        if name.startswith("features."):
            assert torch.equal(value, before[name]), name
    assert not torch.equal(after["fc.1.weight"], before["fc.1.weight"])
    assert not torch.equal(after["heads.age.weight"], before["heads.age.weight"])
    wrong = load_config(
        None, [*SMALL, "model.norm=lrn", f"model.init_from={source.out_dir / 'best.pt'}"]
    )
    with pytest.raises(RunError, match="does not fit this net"):
        prepare_run(open_cache(learn_cache), 1, wrong)
