"""Training never waits for MLflow (issue 25): the run's writer queues epochs and system samples
without blocking, keeps their order, drops the oldest epochs of a full queue and catches them up
from history.json; folds logging at once to a locked SQLite store lose nothing; and a fold whose
tracking server is SIGKILLed mid-training and started again ends with every epoch, test metric
and artifact in MLflow exactly once. Real MLflow: a SQLite store, an `mlflow server` process."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from tasks.training import catch_up
from tests.outage import Server, report, tracked_fold
from tracking.schema import SYSTEM_METRICS_GAP
from tracking.store import Tracker
from tracking.writer import RunWriter


def _epoch(e: int) -> dict[str, Any]:
    return {"epoch": e, "lr": 0.1, "iteration": 6 * e, "val_loss": 1.0 / e, "best": True}


def _put_epochs(out: Path, writer: RunWriter, epochs: range, pause: float = 0.0) -> float:
    """As training does: history.json first, then the writer; the longest put (s)."""
    history: list[dict[str, Any]] = []
    longest = 0.0
    for e in epochs:
        history.append(_epoch(e))
        (out / "history.json").write_text(json.dumps(history))
        start = time.perf_counter()
        writer.epoch(history[-1])
        longest = max(longest, time.perf_counter() - start)
        time.sleep(pause)
    return longest


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class SlowStore:
    """The tracker's log_batch while the store is away: each call takes `delay` s and fails as a
    restarting server or a locked file does, until `back` is set; every batch that got through is
    recorded (val_loss steps in the order sent)."""

    def __init__(self, real: Callable[..., Any], delay: float) -> None:
        self.real, self.delay, self.back = real, delay, threading.Event()
        self.sent: list[int] = []

    def __call__(self, run_id: str, metrics: list[Metric], *args: Any) -> Any:
        if not self.back.is_set():
            time.sleep(self.delay)
            raise MlflowException("store away", TEMPORARILY_UNAVAILABLE)
        got = self.real(run_id, metrics, *args)
        self.sent += [m.step for m in metrics if m.key == "val_loss"]
        return got


def test_the_writer_never_blocks_keeps_order_and_catches_up_what_a_full_queue_dropped(
    tmp_path: Path,
) -> None:
    tracker = Tracker("writer", tmp_path)
    run_id = tracker.start("fold", {})
    slow = SlowStore(tracker.client.log_batch, delay=0.3)
    tracker.client.log_batch = slow  # type: ignore[method-assign,assignment]
    warnings: list[str] = []
    writer = RunWriter(
        tracker,
        run_id,
        lambda: catch_up(tracker, run_id, tmp_path),
        warnings.append,
        capacity=4,
        backoff=(0.05, 0.2),
    )
    longest = _put_epochs(tmp_path, writer, range(1, 11))
    for step in range(3):
        writer.sample({"system/cpu_utilization_percentage": 50.0 + step}, step)
    assert longest < 0.05, f"a put waited {longest:.3f} s for the store"
    assert len(warnings) == 1, warnings  # dropped epochs: said once
    assert "history.json" in warnings[0]
    slow.back.set()
    left = writer.close(timeout=60)
    assert not left, str(left)
    writer.send_left()
    client = tracker.client
    for key in ("val_loss", "iteration", "lr"):
        assert _steps(client, run_id, key) == list(range(1, 11)), key
    assert slow.sent == sorted(slow.sent)  # caught up first, then the queue, in order
    system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert sorted((m.step, m.value) for m in system) == [(0, 50.0), (1, 51.0), (2, 52.0)]
    assert SYSTEM_METRICS_GAP not in client.get_run(run_id).data.tags


def test_a_closed_writer_hands_back_what_it_could_not_send(tmp_path: Path) -> None:
    tracker = Tracker("writer-left", tmp_path)
    run_id = tracker.start("fold", {})
    slow = SlowStore(tracker.client.log_batch, delay=0.05)
    tracker.client.log_batch = slow  # type: ignore[method-assign,assignment]
    writer = RunWriter(tracker, run_id, lambda: set(), capacity=2, backoff=(0.05, 0.1))
    _put_epochs(tmp_path, writer, range(1, 3))
    for step in range(3):  # a full queue of samples: the oldest goes, its step is reported
        writer.sample({"system/cpu_utilization_percentage": 1.0}, step)
    start = time.monotonic()
    left = writer.close(timeout=1)
    assert time.monotonic() - start < 5  # bounded, with the store away
    assert (left.epochs, left.samples, left.lost_steps) == ([1, 2], 2, [0])
    slow.back.set()
    writer.send_left()  # the end of the run: blocking, with the tracker's retries
    catch_up(tracker, run_id, tmp_path)
    assert _steps(tracker.client, run_id, "system/cpu_utilization_percentage") == [1, 2]
    assert _steps(tracker.client, run_id, "val_loss") == [1, 2]
    gap = tracker.client.get_run(run_id).data.tags[SYSTEM_METRICS_GAP]
    assert gap == "1 samples lost (steps 0)"


def test_parallel_folds_on_a_locked_sqlite_store_lose_no_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two folds' writers at once while a third connection holds SQLite's write lock longer than
    MLflow's busy timeout (20 s): "database is locked" is transient; every epoch lands once."""
    caplog.set_level(logging.DEBUG, "tracking.writer")
    tracker = Tracker("parallel", tmp_path)
    runs = [tracker.start(f"fold {k}", {}) for k in (0, 1)]
    outs = [tmp_path / f"fold{k}" for k in (0, 1)]
    writers = []
    for run_id, out in zip(runs, outs, strict=True):
        out.mkdir()
        writers.append(
            RunWriter(
                tracker,
                run_id,
                partial(catch_up, tracker, run_id, out),
                capacity=8,
                backoff=(0.1, 1.0),
            )
        )
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=30, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")  # the write lock, held past MLflow's PRAGMA busy_timeout
    unlock = threading.Timer(21.0, db.rollback)
    unlock.start()
    longest: list[float] = []
    folds = [
        threading.Thread(
            target=lambda w, o: longest.append(_put_epochs(o, w, range(1, 21), 0.2)), args=(w, o)
        )
        for w, o in zip(writers, outs, strict=True)
    ]
    for t in folds:
        t.start()
    for t in folds:
        t.join()
    unlock.join()
    db.close()
    assert max(longest) < 0.1, longest
    assert any("database is locked" in r.getMessage() for r in caplog.records)
    for run_id, out, writer in zip(runs, outs, writers, strict=True):
        left = writer.close(timeout=60)
        assert not left.samples
        catch_up(tracker, run_id, out)  # as the end of a run does
        for key in ("val_loss", "iteration"):
            assert _steps(tracker.client, run_id, key) == list(range(1, 21)), (run_id, key)


@pytest.mark.integration
def test_a_fold_whose_tracking_server_is_killed_keeps_training_and_logs_everything_once(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """Also the smoke run of `benchmarks/tracking_outage.py` (its figures, from the same code,
    with a baseline fold on the same server; the speeds are printed, never asserted)."""
    server = Server(tmp_path / "server")
    try:
        base = tracked_fold(server, tiny_cache, tmp_path / "base", ["train.iterations=60"], False)
        fold = tracked_fold(
            server,
            tiny_cache,
            tmp_path / "outage",
            ["train.iterations=60"],
            outage=True,
            down_epochs=2,
            restart_during=True,
        )
        assert fold.trained is not None
        client = MlflowClient(server.url)
        run = client.get_run(fold.trained.run_id)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        histories = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
        figures = report([base], [fold], server.url)
    finally:
        server.close()
    print("\n".join(figures))
    assert (
        figures[-2]
        == "epochs held once: [{'epochs': 10, 'once': True}, {'epochs': 10, 'once': True}]"
    )
    assert figures[-1].startswith("ratio outage / baseline")
    assert fold.killed is not None
    assert fold.back is not None
    # training was never held up: epochs kept ending while the server was away
    down = [t for t in fold.ends if fold.killed < t < fold.back]
    assert len(down) >= 2, (fold.killed, fold.back, fold.ends)
    gaps = [b - a for a, b in zip(fold.ends, fold.ends[1:], strict=False)]
    assert max(gaps[1:]) < 20, gaps  # the old logging stalled an epoch for minutes

    out = tmp_path / "outage" / "fold"
    history = json.loads((out / "history.json").read_text())
    epochs = len(history)
    assert run.info.status == "FINISHED"
    per_epoch = {k for k, v in history[0].items() if k != "epoch" and isinstance(v, int | float)}
    for key in per_epoch:  # exactly one value per step, steps == epochs
        assert sorted(m.step for m in histories[key]) == list(range(1, epochs + 1)), key
    test_keys = {k for k in histories if k.startswith("test_")}
    summary = json.loads((out / "result.json").read_text())
    assert test_keys == {f"test_{k}" for k, v in summary["test"].items() if isinstance(v, float)}
    for key in test_keys | {"best_epoch", "n_test"}:
        assert len(histories[key]) == 1, key
    assert sorted(artifacts) == sorted(set(artifacts))
    files = ["result.json", "history.json", "config.json", "test_predictions.csv"]
    files += ["learning_curves.png", "best.pt", *(f"confusion_{h}.png" for h in summary["classes"])]
    assert set(artifacts) == {f for f in files if (out / f).exists()}
    # system samples taken while the server was away were sent later, steps kept unique
    system = histories["system/cpu_utilization_percentage"]
    steps = sorted(m.step for m in system)
    assert steps == list(range(len(steps))), steps
    stamps = [m.timestamp / 1000 for m in system]
    wall = time.time() - time.monotonic()
    assert any(fold.killed + wall < s < fold.back + wall for s in stamps)
    assert SYSTEM_METRICS_GAP not in run.data.tags
