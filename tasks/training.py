"""The skeleton that a fold and pretraining share: train on a free slot, resuming from the
checkpoint, then log the finished run to MLflow; and the retry rule for both.

A run is identified by its tags (`tracking.schema`): a FINISHED run with them is reused by the
caller, a killed one resumes from `out`'s checkpoint, and one trained but killed before it was
logged is only logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.logging.loggers import task_run_logger

from agegender import plots
from agegender.cli import EXPECTED
from agegender.config import Config, flatten
from agegender.train import TrainSet, epoch_line, train
from tasks.slots import fold_device, on_device, slot
from tracking.schema import device_tags, trained_tags
from tracking.store import Tracker


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """A retry resumes from the checkpoint, after a crash or a lost server; bad input (data,
    config, a missing GPU: `agegender.cli.EXPECTED`) stays bad, so it is not retried."""
    try:
        state.result()
    except EXPECTED as exc:
        # Prefect logs nothing when the condition says no: keep the record and its traceback
        # in the run's log (the UI), as it does for a task without retries
        task_run_logger(task_run, task).error(
            f"Task run failed with exception: {exc!r} - not retried (bad input stays bad)",
            exc_info=True,
        )
        return False
    except BaseException:
        return True
    return True


def scalar_metrics(test: dict[str, Any]) -> dict[str, float]:
    """The per-fold numbers that get a mean and a std (accuracies, 1-off, their 10-crop twins)."""
    return {k: float(v) for k, v in test.items() if isinstance(v, float)}


@dataclass(frozen=True)
class TrackedRun:
    """Where a training run is logged and kept: `title` names the MLflow run and its log lines."""

    tracker: Tracker
    title: str
    tags: dict[str, str]
    out: Path
    parent_id: str | None = None
    checkpoint_folder: str | None = None  # where best.pt goes among the run's artifacts


@dataclass(frozen=True)
class Trained:
    run_id: str
    summary: dict[str, Any]
    trained: bool  # False: it had trained before and was only logged now


def train_tracked(
    run: TrackedRun,
    ts: TrainSet,
    cfg: Config,
    also: Callable[[str], None] | None = None,
) -> Trained:
    """Train `ts` on a free slot (resuming), then log params, metrics, curves and files as a
    new run; `also(run_id)` logs more before the run is closed. A failure while logging marks
    the run FAILED, so a retry logs it again instead of reusing half a record."""
    log = get_run_logger()
    logged_before = (run.out / "result.json").exists()  # trained, killed before it was logged
    requested = cfg.train.device
    with slot() as free:
        device, fallback = fold_device(requested, free)
        cfg = on_device(cfg, device)
        if logged_before:
            state = "logging its finished result"
        elif (run.out / "last.pt").exists():
            state = "resuming from its checkpoint"
        else:
            state = "training"
        log.info(f"{run.title}: {state} on {device} ({ts.name}) -> {run.out}")
        for line in ts.about:
            log.info(f"{run.title}: {line}")
        result = train(
            ts, cfg, run.out, resume=True, log=lambda r: log.info(f"{run.title}: {epoch_line(r)}")
        )
    s = result.summary
    test = scalar_metrics(s["test"])
    log.info(
        f"{run.title}: test "
        + ", ".join(f"{k} {v:.3f}" for k, v in test.items() if "10crop" not in k)
    )
    tags = run.tags | device_tags(requested, fallback)
    run_id = run.tracker.start(run.title, tags | trained_tags(s["device"]), run.parent_id)
    try:
        log_training(run.tracker, run_id, run.out, cfg, s, run.title, run.checkpoint_folder)
        if also is not None:
            also(run_id)
    except BaseException:
        run.tracker.finish(run_id, status="FAILED")
        raise
    run.tracker.finish(run_id)
    return Trained(run_id, s, trained=not logged_before)


def log_training(
    tracker: Tracker,
    run_id: str,
    out: Path,
    cfg: Config,
    s: dict[str, Any],
    title: str,
    checkpoint_folder: str | None = None,
) -> None:
    """A finished training run (fold or pretraining): params, test metrics, per-epoch series,
    learning curves and confusion matrices, and its files as artifacts."""
    history = json.loads((out / "history.json").read_text())
    tracker.log(
        run_id,
        params=flatten(cfg.model_dump(mode="json")),
        metrics={f"test_{k}": v for k, v in scalar_metrics(s["test"]).items()}
        | {f"selected_val_{k}": v for k, v in scalar_metrics(s["val"]).items()}
        | {
            "best_epoch": s["best_epoch"],
            "tested_epoch": s.get("tested_epoch", s["best_epoch"]),
            "epochs": s["epochs"],
            "selection_score": s.get("selection_score"),
            "n_train": s["sizes"]["train"],
            "n_val": s["sizes"]["val"],
            "n_test": s["sizes"]["test"],
        },
    )
    tracker.log_history(run_id, history)
    plots.learning_curves(history, out / "learning_curves.png", title)
    for head, labels in s["classes"].items():
        if f"{head}_confusion" in s["test"]:
            plots.confusion_matrix(
                s["test"][f"{head}_confusion"],
                labels,
                out / f"confusion_{head}.png",
                f"{head}, {title} test (centre crop)",
            )
    files = ["result.json", "history.json", "config.json", "test_predictions.csv"]
    files += ["learning_curves.png", *(f"confusion_{h}.png" for h in s["classes"])]
    for name in files:
        if (out / name).exists():
            tracker.artifact(run_id, out / name)
    tracker.artifact(run_id, out / "best.pt", checkpoint_folder)
