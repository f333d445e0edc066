"""The skeleton that a fold and pretraining share: train on a free slot, resuming from the
checkpoint, in a live MLflow run (open from the first epoch on); and the retry rule for both.

A run is identified by its tags (`tracking.schema`): a FINISHED run with them is reused by the
caller, a killed one resumes from `out`'s checkpoint in the same MLflow run, and one trained but
killed before it was logged is only logged.
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
from tracking.schema import DataInput, data_inputs, device_tags, git_commit, trained_tags
from tracking.store import Tracker
from tracking.writer import RunWriter


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


RUN_ID_FILE = "mlflow_run_id"  # in `out`: the run a resumed training continues
WRITER_WAIT_S = 30.0  # for the writer's queue at the end, before blocking calls take over


def train_tracked(
    run: TrackedRun,
    ts: TrainSet,
    cfg: Config,
    also: Callable[[str], None] | None = None,
) -> Trained:
    """Train `ts` on a free slot (resuming) in a RUNNING run: params and tags first, each
    epoch's numbers as it ends, system metrics meanwhile; then test metrics, curves and files.
    `also(run_id)` logs more before the run is closed. A resumed training reopens its own run
    (`RUN_ID_FILE`). A failure marks the run FAILED, so a retry logs it again instead of
    reusing half a record."""
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
        tags = run.tags | device_tags(requested, fallback) | {"git_commit": git_commit()}
        run_id = open_run(run, tags, flatten(cfg.model_dump(mode="json")))
        log.info(f"{run.title}: MLflow run {run_id}")

        # epochs and system samples go through a writer thread: training never waits for
        # MLflow; what it cannot send follows from history.json (`catch_up`) once the store
        # answers, and at the end
        writer = RunWriter(
            run.tracker, run_id, lambda: catch_up(run.tracker, run_id, run.out), log.warning
        )

        def epoch_done(record: dict[str, Any]) -> None:
            log.info(f"{run.title}: {epoch_line(record)}")
            writer.epoch(record)

        try:
            with writer.system_metrics():
                result = train(ts, cfg, run.out, resume=True, log=epoch_done)
        except BaseException as exc:
            writer.close(WRITER_WAIT_S)  # the rest is in history.json: a retry logs it
            run.tracker.finish(run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
    left = writer.close(WRITER_WAIT_S)
    if left:
        log.warning(f"{run.title}: MLflow did not take {left} live; logging it now")
    s = result.summary
    test = scalar_metrics(s["test"])
    log.info(
        f"{run.title}: test "
        + ", ".join(f"{k} {v:.3f}" for k, v in test.items() if "10crop" not in k)
    )
    try:
        writer.send_left()
        run.tracker.log(run_id, tags=trained_tags(s))
        log_training(run.tracker, run_id, run.out, s, run.title, run.checkpoint_folder)
        run.tracker.log_inputs(run_id, inputs_of(ts, s))
        if also is not None:
            also(run_id)
    except BaseException:
        run.tracker.finish(run_id, status="FAILED")
        raise
    run.tracker.finish(run_id)
    return Trained(run_id, s, trained=not logged_before)


def open_run(run: TrackedRun, tags: dict[str, str], params: dict[str, Any]) -> str:
    """The run `out` names when it can be reopened (a resume continues its own run), else a
    new one; with the params (those it lacks) and the epochs `out` holds that it lacks."""
    known = run.out / RUN_ID_FILE
    found = None
    if known.is_file():
        found = run.tracker.reopen(known.read_text().strip(), run.tags)
    if found is not None:
        run_id = found.run_id
        run.tracker.log(run_id, tags=tags)
        # a param cannot change (a resume on another slot's device): the first value stays
        params = {k: v for k, v in params.items() if k not in found.params}
    else:
        run_id = run.tracker.start(run.title, tags, run.parent_id)
        run.out.mkdir(parents=True, exist_ok=True)
        known.write_text(run_id + "\n")
    run.tracker.log(run_id, params=params)
    catch_up(run.tracker, run_id, run.out)
    return run_id


def catch_up(tracker: Tracker, run_id: str, out: Path) -> set[int]:
    """Log the epochs of `out`'s history.json that the run lacks (trained before a resume into
    a new run, killed between the checkpoint and the epoch's log line, or not taken by the
    writer while the store was away); the epochs the run then holds."""
    path = out / "history.json"
    if not path.is_file():
        return set()
    history = json.loads(path.read_text())
    have = tracker.logged_steps(run_id, "iteration") if history else set()
    missing = [h for h in history if int(h["epoch"]) not in have]
    if missing:
        tracker.log_history(run_id, missing)
    return have | {int(h["epoch"]) for h in history}


def inputs_of(ts: TrainSet, s: dict[str, Any]) -> list[DataInput]:
    """What the run trained, selected and tested on: its parts, their sizes, the cache."""
    cache = ts.cache
    source = str(cache.manifest.get("data_root") or cache.path)
    sizes = {p: int(n) for p, n in s["sizes"].items()}
    task = str(s.get("task", "multitask"))
    return data_inputs(cache.dataset, ts.name, cache.fingerprint, source, sizes, task)


def log_training(
    tracker: Tracker,
    run_id: str,
    out: Path,
    s: dict[str, Any],
    title: str,
    checkpoint_folder: str | None = None,
) -> None:
    """A finished training run (fold or pretraining): test metrics, the epochs not logged live
    yet, learning curves and confusion matrices, and its files as artifacts (params are logged
    when it starts)."""
    history = json.loads((out / "history.json").read_text())
    catch_up(tracker, run_id, out)
    tracker.log(
        run_id,
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
