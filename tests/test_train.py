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
from agegender.config import deviations, load_config
from agegender.splits import make_split
from agegender.train import (
    RunError,
    lr_factor,
    prepare_run,
    total_iterations,
    train_epoch,
    train_fold,
)
from tests.conftest import REPO, run_cli

# Small and quick on a CPU: 48 px crops of 56 px images, batch norm, Adam with a cosine decay,
# per-channel standardisation, the epoch picked on validation (not the paper's settings).
SMALL = [
    "data.crop=48",
    "data.normalize=channel_mean_std",
    "optim.name=adam",
    "optim.lr=0.0005",
    "optim.weight_decay=0",
    "optim.schedule=cosine",
    "optim.head_lr_mult=1",
    "optim.bias_lr_mult=1",
    "model.norm=batchnorm",
    "train.test_at=best_val",
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
    train_images = cache.images[np.unique(cache.slots[split.train.rows])]
    train_px = train_images.reshape(-1, 3)
    np.testing.assert_allclose(res.summary["normalize"]["mean"], train_px.mean(0), rtol=1e-5)
    every_px = cache.images[np.unique(cache.slots)].reshape(-1, 3)
    assert not np.allclose(res.summary["normalize"]["mean"], every_px.mean(0), rtol=1e-5)
    # the paper's: the mean image of every training image (Caffe's compute_image_mean)
    paper = load_config(None, ["data.crop=48", "train.iterations=1", "train.tencrop=false"])
    res = train_fold(learn_cache, 2, paper, tmp_path / "paper")
    assert res.summary["normalize"] == {
        "kind": "mean_image",
        "mean": pytest.approx(train_px.mean(0), rel=1e-5),
        "std": None,
        "shape": [56, 56, 3],
    }
    best = torch.load(tmp_path / "paper" / "best.pt", weights_only=True)
    np.testing.assert_allclose(best["normalize"]["mean"], train_images.mean(0), rtol=1e-5)
    assert best["normalize"]["std"] is None


def test_the_final_checkpoint_is_tested_and_validation_only_monitored(
    learn_cache: Path, tmp_path: Path
) -> None:
    config = load_config(None, [*SMALL, "train.test_at=final", "train.epochs=3", "train.seed=2"])
    res = train_fold(learn_cache, 1, config, tmp_path / "final").summary
    history = json.loads((tmp_path / "final" / "history.json").read_text())
    assert (res["test_at"], res["tested_epoch"], res["epochs"]) == ("final", 3, 3)
    assert res["selected_by"] == "final checkpoint (validation monitored only)"
    assert res["val"]["loss"] == history[-1]["val_loss"]  # the tested weights' validation
    assert res["selection_score"] == -history[-1]["val_loss"]
    assert len(history) == 3
    assert all("val_loss" in h for h in history)
    best = torch.load(tmp_path / "final" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "final" / "last.pt", weights_only=True)
    assert best["epoch"] == 3
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
    # best_val tests the epoch that validation picked, and says so
    picked = load_config(None, [*SMALL, "train.test_at=best_val", "train.epochs=3", "train.seed=2"])
    res = train_fold(learn_cache, 1, picked, tmp_path / "best").summary
    assert res["tested_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert res["selected_by"] == "val loss"


def test_solver_groups_follow_caffes_multipliers(learn_cache: Path) -> None:
    """The released prototxt: biases at 2x lr without weight decay, fc8 (the heads) at 10x, and
    the step policy drops every 10k (of 50k) iterations, or once when asked."""
    run = prepare_run(open_cache(learn_cache), 0, load_config(None, ["data.crop=48"]))
    groups = run.optimizer.param_groups  # heads' weights, biases; the backbone's weights, biases
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 2e-2, 1e-3, 2e-3])
    assert [g["weight_decay"] for g in groups] == pytest.approx([5e-4, 0, 5e-4, 0])
    assert [len(g["params"]) for g in groups] == [2, 2, 5, 5]
    factor = run.scheduler.lr_lambdas[0]
    assert [factor(i) for i in (0, 9_999, 10_000, 20_000, 49_999)] == pytest.approx(
        [1, 1, 0.1, 0.01, 1e-4]
    )
    once = prepare_run(
        open_cache(learn_cache), 0, load_config(None, ["data.crop=48", "optim.step_repeat=false"])
    )
    assert [once.scheduler.lr_lambdas[0](i) for i in (9_999, 10_000, 49_999)] == [1, 0.1, 0.1]


def test_the_papers_step_stays_at_10k_whatever_the_runs_length() -> None:
    """The paper drops the rate after 10k iterations (Caffe's stepsize), not after a fraction of
    training: a shorter run (2,000 iterations, or 30 epochs of 10,000 rows = 6,000) never drops,
    a longer one (100k) drops at 10k, 20k, ...; `optim.decay_every`, a fraction, still moves."""

    def lr(overrides: list[str], its: tuple[int, ...], n_train: int = 0) -> list[float]:
        config = load_config(None, overrides)
        factor = lr_factor(config, total_iterations(config, n_train))
        return [config.optim.lr * factor(i) for i in its]

    assert lr(["train.iterations=2000"], (0, 400, 1_999)) == pytest.approx([1e-3] * 3)
    assert lr(["train.epochs=30"], (0, 1_200, 5_999), 10_000) == pytest.approx([1e-3] * 3)
    assert lr(["train.iterations=100000"], (9_999, 10_000, 19_999, 20_000)) == pytest.approx(
        [1e-3, 1e-4, 1e-4, 1e-5]
    )
    once = ["train.iterations=100000", "optim.step_repeat=false"]
    assert lr(once, (9_999, 10_000, 99_999)) == pytest.approx([1e-3, 1e-4, 1e-4])
    fraction = ["train.iterations=2000", "optim.decay_every=0.2"]
    assert lr(fraction, (399, 400, 799, 800)) == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    assert lr(["train.epochs=30", "optim.decay_every=0.2"], (1_199, 1_200), 10_000) == (
        pytest.approx([1e-3, 1e-4])
    )


def test_deterministic_mode_is_scoped_to_the_run(learn_cache: Path, tmp_path: Path) -> None:
    config = load_config(
        None, [*SMALL, "train.iterations=4", "train.tencrop=false", "train.deterministic=true"]
    )
    a = train_fold(learn_cache, 0, config, tmp_path / "a")
    b = train_fold(learn_cache, 0, config, tmp_path / "b")
    assert a.test == b.test
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


# The paper preset, only smaller: the Levi-Hassner net with LRN, Caffe's initialisation, SGD with
# the released solver's momentum, weight decay and multipliers, batch 50, the training images'
# mean image subtracted from 0-255 pixels (no std), a fixed schedule (no early stopping, the final
# weights tested), on 48 px crops of 56 px images, with the schedule compressed to what a CPU
# affords: 2,000 iterations at lr 1e-3, one drop to 1e-4 at 80 %.
PAPER_SMALL = [
    "data.crop=48",
    "train.iterations=2000",
    "optim.step_size=1600",
    "optim.step_repeat=false",
    "train.tencrop=false",
]


# Controls on permuted labels, each with its own permutation and initialisation (train.seed),
# trained exactly as the real run: what a net makes of this small test part (100 faces of 33
# users) without a label to learn spreads widely (gender 0.447 and 0.636 against a 0.509
# majority were measured), so the real run is set against each of them and against the
# majority class with its user-clustered interval, not against one control with a margin.
CONTROL_SEEDS = (1, 2)


@pytest.mark.integration
@pytest.mark.timeout(1800)  # three runs of 2,000 iterations: ~460 s on an idle 2-core machine
def test_paper_preset_learns(learn_cache: Path, tmp_path: Path) -> None:
    """The paper's settings train (from the raw-scale inputs their init expects), and what they
    learn comes from the pixels: the real run's user-clustered 95 % interval lies above what every
    control on permuted labels scores (the fold's test part is 100 faces of 33 users, too few
    for a margin over one control to mean anything)."""
    config = load_config(None, PAPER_SMALL)
    assert config.preset == "paper"
    assert deviations(config) == [
        "data.crop=48",
        "optim.step_size=1600",
        "optim.step_repeat=False",
        "train.iterations=2000",
        "train.tencrop=False",
    ]
    real = train_fold(learn_cache, 0, config, tmp_path / "real").summary
    controls = [
        train_fold(
            learn_cache,
            0,
            load_config(
                None,
                [
                    *PAPER_SMALL,
                    "data.shuffle_labels=true",
                    f"train.seed={seed}",
                ],
            ),
            tmp_path / f"control{seed}",
        ).summary["test"]
        for seed in CONTROL_SEEDS
    ]
    t = real["test"]
    age_major, gender_major = _majority(t["age_confusion"]), _majority(t["gender_confusion"])
    for m in ("age_acc", "age_1off", "gender_acc"):
        print(
            f"{m}: paper preset {t[m]:.3f} [{t[m + '_ci_low']:.3f}, {t[m + '_ci_high']:.3f}]; "
            f"controls {', '.join(f'{c[m]:.3f}' for c in controls)}"
        )
    print(f"majority age {age_major:.3f}, gender {gender_major:.3f}")
    # Measured: see "Does the paper preset train?" in the README.
    assert real["test_at"] == "final"
    assert real["iterations"] == 2000
    # age and 1-off: the whole interval above every control (margins of ~0.2 and ~0.45 when the
    # test was written); gender, the weakest signal: above every control, and the interval above
    # the majority class (one earlier control scored 0.636 against a 0.509 majority)
    for m in ("age_acc", "age_1off"):
        assert t[m + "_ci_low"] > max(c[m] for c in controls), m
    assert t["gender_acc"] > max(c["gender_acc"] for c in controls)
    assert t["gender_acc_ci_low"] > gender_major
    assert t["age_acc_ci_low"] > age_major
    assert all(c["age_acc"] <= age_major + 0.08 for c in controls)


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
    checkpoint = torch.load(source.out_dir / "best.pt", weights_only=True)["model"]
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
    # heads (weights, biases), then the backbone (weights, biases)
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5])
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


def test_train_fold_cli_takes_a_preset_and_overrides_after_it(
    learn_cache: Path, tmp_path: Path
) -> None:
    res = run_cli(
        "train-fold",
        "--cache",
        learn_cache,
        "--fold",
        "1",
        "--out",
        tmp_path / "run",
        "--json",
        "--preset",
        "modern",
        "data.crop=48",
        "train.iterations=2",
        "train.tencrop=false",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["preset"], summary["test_at"], summary["iterations"]) == (
        "modern",
        "best_val",
        2,
    )
    assert "preset modern with data.crop=48, train.iterations=2, train.tencrop=False" in res.stderr
    assert "fold 1 val " in res.stderr  # the validation part's label distribution
    bad = run_cli("train-fold", "--cache", learn_cache, "--fold", "1", "--bogus", "x=1")
    assert bad.returncode == 2
    assert "unrecognized arguments: --bogus" in bad.stderr
