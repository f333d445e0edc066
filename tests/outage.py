"""A fold trained in a live run on a real `mlflow server` that is SIGKILLed mid-training and
started again on its port and store: what `test_tracking_outage` checks and
`benchmarks/tracking_outage.py` times (issue 25: training never waits for MLflow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from prefect.logging import disable_run_logger

from agegender.cache import open_cache
from agegender.config import load_config
from agegender.train import adience_fold
from tasks.slots import set_slots
from tasks.training import TrackedRun, Trained, train_tracked
from tests.conftest import SHORT_EPOCHS, free_port, mlflow_serving
from tracking.store import Tracker

SAMPLING = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"


class Server:
    """A real `mlflow server` that can be SIGKILLed and started again on its port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack = contextlib.ExitStack()
        self.start()

    def start(self) -> None:
        self.proc = self._stack.enter_context(mlflow_serving(self.root, self.port))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn
        self.proc.wait()
        self._stack.close()

    def close(self) -> None:
        self._stack.close()


@dataclass
class Fold:
    """A tracked fold as it went: when each epoch ended (monotonic s), when the server was
    killed and answered again, the run."""

    trained: Trained | None = None
    error: BaseException | None = None
    ends: list[float] = field(default_factory=list)
    killed: float | None = None
    back: float | None = None
    images_per_epoch: int = 0

    def speed(self) -> float:
        """Images/s from the first epoch's end to the last's (the first holds the warm-up)."""
        return (len(self.ends) - 1) * self.images_per_epoch / (self.ends[-1] - self.ends[0])


def tracked_fold(
    server: Server,
    cache: Path,
    root: Path,
    args: list[str],
    outage: bool,
    down_epochs: int = 2,
    restart_during: bool = False,
) -> Fold:
    """`train_tracked` on fold 0 in experiment `root.name`, epochs timed from history.json. With
    `outage`: the server is killed once the run holds epoch 1 and started again after
    `down_epochs` more epochs ended (`restart_during`) or once training has ended."""
    cfg = load_config(None, [*SHORT_EPOCHS, *args])
    fold = Fold(images_per_epoch=cfg.data.batch_size)
    set_slots(1)
    out = root / "fold"
    # this process's tracking settings for the run: the server, a system sample each second
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": server.url, SAMPLING: "1"}):
        tracker = Tracker(root.name, root / "runs")
        run = TrackedRun(tracker, "gender fold 0", {"kind": "fold", "fold": "0"}, out)
        ts = adience_fold(open_cache(cache), 0, cfg)

        def work() -> None:
            try:
                with disable_run_logger():
                    fold.trained = train_tracked(run, ts, cfg)
            except BaseException as exc:
                fold.error = exc

        trainer = threading.Thread(target=work)
        trainer.start()
        watcher = threading.Thread(target=_watch, args=(out, fold, trainer), daemon=True)
        watcher.start()
        if outage:
            _outage(server, tracker, out, fold, trainer, down_epochs, restart_during)
        trainer.join()
        watcher.join()
    if fold.error is not None:
        raise fold.error
    iterations = json.loads((out / "history.json").read_text())[0]["iteration"]
    fold.images_per_epoch = iterations * cfg.data.batch_size
    return fold


def _watch(out: Path, fold: Fold, trainer: threading.Thread) -> None:
    """Each epoch's end, as history.json grows (written just before the epoch is logged)."""
    path, seen = out / "history.json", 0
    while True:
        alive = trainer.is_alive()
        with contextlib.suppress(OSError, ValueError):
            n = len(json.loads(path.read_text()))
            fold.ends += [time.monotonic()] * (n - seen)
            seen = max(seen, n)
        if not alive:
            return
        time.sleep(0.02)


def _outage(
    server: Server,
    tracker: Tracker,
    out: Path,
    fold: Fold,
    trainer: threading.Thread,
    down_epochs: int,
    restart_during: bool,
) -> None:
    run_file = out / "mlflow_run_id"
    while trainer.is_alive():  # until the run holds epoch 1
        if run_file.is_file():
            run_id = run_file.read_text().strip()
            if tracker.client.get_metric_history(run_id, "val_loss"):
                break
        time.sleep(0.1)
    server.kill()
    fold.killed = time.monotonic()
    killed_at = len(fold.ends)
    while trainer.is_alive():
        if restart_during and len(fold.ends) >= killed_at + down_epochs:
            break
        if (out / "result.json").is_file():
            break
        time.sleep(0.05)
    server.start()
    fold.back = time.monotonic()


def report(bases: list[Fold], hits: list[Fold], url: str) -> list[str]:
    """`benchmarks/tracking_outage.py`'s figures (each arm's best speed, what each outage
    spanned, the epochs each run holds once, the ratio), also printed by the outage test, which
    is the benchmark's smoke run."""
    b, o = max(f.speed() for f in bases), max(f.speed() for f in hits)
    each = [[round(f.speed(), 1) for f in arm] for arm in (bases, hits)]
    lines = [
        f"baseline (server up)         : {b:8.1f} images/s {each[0]}",
        f"outage (killed after epoch 1): {o:8.1f} images/s {each[1]}",
    ]
    for hit in hits:
        assert hit.killed is not None
        assert hit.back is not None
        during = sum(hit.killed < t < hit.back for t in hit.ends)
        longest = max(b - a for a, b in zip(hit.ends, hit.ends[1:], strict=False))
        lines.append(
            f"  server down {hit.back - hit.killed:.1f} s, {during} epochs ended while down, "
            f"longest epoch {longest:.1f} s"
        )
    held = [_epochs_held(url, f) for f in (*bases, *hits)]
    lines.append(f"epochs held once: {held}")
    lines.append(f"ratio outage / baseline      : {o / b:.3f}")
    return lines


def _epochs_held(url: str, fold: Fold) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    assert fold.trained is not None
    steps = [m.step for m in MlflowClient(url).get_metric_history(fold.trained.run_id, "val_loss")]
    return {"epochs": len(fold.ends), "once": sorted(steps) == list(range(1, len(fold.ends) + 1))}
