"""A background writer per run: training never waits for MLflow (issue 25).

Logged on the training thread, each epoch waited for the store: with the server away, through
`Tracker._retry` and MLflow's own HTTP retries, an epoch stalled for minutes. Now the trainer only
puts an epoch (and the system-metrics monitor a sample) in a bounded, ordered queue; one daemon
thread per run sends it in batches, backing off while the store is away (a server down, a locked
SQLite file). A full queue drops its oldest epochs rather than block: every epoch is in
history.json first, and the caller's `catch_up` logs those the run lacks once the store answers
again (the writer calls it) and at the end (the caller). System samples keep the step and time
they were taken at; `close` hands back those it could not send, and the steps of any it dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric

from deployments.services import health
from tracking.schema import SYSTEM_METRICS_GAP
from tracking.store import Tracker, epoch_metrics, retry_would_help

_log = logging.getLogger(__name__)
CAPACITY = 512  # epochs and samples queued (a sample each 10 s: 85 minutes of outage)
BATCH = 1000  # metrics per log_batch (the REST API's limit)


@dataclass(frozen=True)
class _Item:
    metrics: list[Metric]
    epoch: int | None = None  # an epoch's numbers (else a system-metrics sample)


@dataclass
class Unsent:
    """What `close` could not send: epochs (in history.json: `catch_up` logs them), system
    samples (`send_left` logs them, blocking), the steps of samples dropped from a full queue,
    and batches the store refused for good."""

    epochs: list[int] = field(default_factory=list)
    samples: int = 0
    lost_steps: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.epochs or self.samples or self.lost_steps or self.errors)

    def __str__(self) -> str:
        parts = [f"epochs {self.epochs}" if self.epochs else ""]
        parts += [f"{self.samples} system metrics" if self.samples else ""]
        parts += [f"system samples lost at steps {self.lost_steps}" if self.lost_steps else ""]
        parts += [f"refused: {'; '.join(self.errors)}" if self.errors else ""]
        return ", ".join(p for p in parts if p) or "nothing"


class RunWriter:
    """Sends one run's epochs and system samples from a thread of its own; `epoch` and `sample`
    never block (beyond a lock) and never raise."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        catch_up: Callable[[], Iterable[int]],
        warn: Callable[[str], Any] = _log.warning,
        capacity: int = CAPACITY,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        """`catch_up()` logs the epochs of history.json the run lacks and returns the epochs
        the run then holds."""
        self.tracker, self.run_id = tracker, run_id
        self._catch_up, self._warn = catch_up, warn
        self.capacity, self._backoff = capacity, backoff
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._logged: set[int] = set()  # epochs the run holds (sent here or caught up)
        self._behind = False  # epochs dropped: catch up when the store answers
        self._dropped: list[int] = []
        self._closing = self._abandon = False
        self._unsent = Unsent()
        self._warned: set[str] = set()
        self._left: list[Metric] = []  # samples close() could not send
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"mlflow-writer-{run_id[:8]}"
        )
        self._thread.start()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch(self, record: Mapping[str, Any]) -> None:
        """An epoch's numbers (step = epoch), stamped now: the time it ended."""
        now = int(time.time() * 1000)
        self._put(_Item(epoch_metrics(record, now), int(record["epoch"])))

    def sample(self, metrics: Mapping[str, float], step: int) -> None:
        """A system-metrics sample, stamped now, at its own step."""
        now = int(time.time() * 1000)
        self._put(_Item([Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._closing:
                self._note("late", "a record came after close: not sent")
                return
            if len(self._queue) >= self.capacity:
                self._drop()
            self._queue.append(item)
            self._cond.notify()

    def _drop(self) -> None:
        """The oldest epoch goes (history.json has it: caught up later), else the oldest
        sample (its step is reported)."""
        victim = next((i for i in self._queue if i.epoch is not None), self._queue[0])
        self._queue.remove(victim)
        if victim.epoch is not None:
            self._behind = True
            self._dropped.append(victim.epoch)
            self._note(
                "drop-epoch",
                f"MLflow writer queue full ({self.capacity}): oldest epochs dropped from it; "
                "they are in history.json and are caught up when the store answers",
            )
        else:
            self._unsent.lost_steps.append(victim.metrics[0].step if victim.metrics else -1)
            self._note("drop-sample", "MLflow writer queue full: oldest system samples dropped")

    def _note(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn(text)

    def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            with self._cond:
                while not (self._queue or self._behind or self._closing):
                    self._cond.wait()
                if self._abandon or not (self._queue or self._behind):
                    return
                behind, self._behind = self._behind, False
                batch = self._head()
            try:
                self._reachable()
                if behind:
                    held = set(self._catch_up())
                    with self._cond:
                        self._logged |= held
                self._send(batch)
                delay = self._backoff[0]
            except Exception as exc:  # the store away: wait, then try again
                with self._cond:
                    if not retry_would_help(exc):  # the end of the run catches up, or says why
                        self._refused(batch, exc)
                        continue
                    self._behind |= behind
                    if self._abandon:
                        return
                    _log.debug("MLflow writer: %s; again in %.1f s", exc, delay)
                    self._cond.wait(delay)
                delay = min(delay * 2, self._backoff[1])

    def _head(self) -> list[_Item]:
        """The oldest items, up to BATCH metrics (at least one item)."""
        taken: list[_Item] = []
        size = 0
        for item in self._queue:
            if taken and size + len(item.metrics) > BATCH:
                break
            taken.append(item)
            size += len(item.metrics)
        return taken

    def _reachable(self) -> None:
        """A server's /health first (one request, no retries): MLflow's own retries against a
        dead server take minutes, and close() waits for a call in flight."""
        if self.tracker.local_store:
            return
        problem = health(self.tracker.uri, timeout=5)
        if problem is not None:
            raise ConnectionError(f"MLflow at {self.tracker.uri}: {problem}")

    def _send(self, batch: list[_Item]) -> None:
        with self._cond:
            new = [i for i in batch if i.epoch is None or i.epoch not in self._logged]
        metrics = [m for i in new for m in i.metrics]
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics, attempts=1)
        self._done(batch, new)

    def _done(self, batch: list[_Item], sent: list[_Item]) -> None:
        """Off the queue's head (items dropped meanwhile are not there any more)."""
        with self._cond:
            self._logged |= {i.epoch for i in sent if i.epoch is not None}
            ids = {id(i) for i in batch}
            while self._queue and id(self._queue[0]) in ids:
                self._queue.popleft()
            self._cond.notify_all()

    def _refused(self, batch: list[_Item], exc: Exception) -> None:
        """A batch the store refuses for good (no such run, a bad value): reported, not
        retried forever (called with the lock held)."""
        self._unsent.errors.append(str(exc))
        self._note("refused", f"MLflow refused a batch, not retried: {exc}")
        ids = {id(i) for i in batch}
        while self._queue and id(self._queue[0]) in ids:
            self._queue.popleft()

    @contextmanager
    def system_metrics(self) -> Iterator[None]:
        """MLflow's system-metrics monitor (CPU, memory, disk, network; GPUs through
        nvidia-ml-py) on this run while the block runs, its samples sent by this writer with
        their own steps and times (`_QueuedMonitor`). It samples every
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's setting, default 10 s);
        AGEGENDER_SYSTEM_METRICS=0 turns it off."""
        if os.environ.get("AGEGENDER_SYSTEM_METRICS", "1").lower() in ("0", "false", "no"):
            yield
            return
        for name in ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its start/stop lines per run
        monitor = _queued_monitor(self)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def close(self, timeout: float = 30.0) -> Unsent:
        """Stop taking records and send what is queued, for `timeout` seconds at most (retrying
        while the store is away); then what is left is handed back. A call already in flight is
        waited for (MLflow's own HTTP limits bound it), so nothing is sent after close returns."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            unsent = self._unsent
            queued = {i.epoch for i in left if i.epoch is not None}
            unsent.epochs = sorted((queued | set(self._dropped)) - self._logged)
            self._left = [m for i in left if i.epoch is None for m in i.metrics]
            unsent.samples = len(self._left)
        return unsent

    def send_left(self) -> None:
        """After `close`: the system samples it could not send, with the tracker's retries
        (blocking, raising `TrackingError` as every end-of-run call does), and how many samples
        a full queue lost (`SYSTEM_METRICS_GAP`, with their steps: the others keep theirs)."""
        if self._left:
            self.tracker.log_metrics(self.run_id, self._left)
            self._left = []
        lost = self._unsent.lost_steps
        if lost:
            gap = f"{len(lost)} samples lost (steps {', '.join(map(str, lost[:50]))})"
            self.tracker.log(self.run_id, tags={SYSTEM_METRICS_GAP: gap})


class _ToWriter:
    """Stands in for the monitor's `BatchMetricsLogger`: MLflow's `publish_metrics` (its
    prefix, its step count) hands each sample to the writer instead of logging it."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        self.data: list[Metric] = []  # what MLflow's debug lines read
        self.total_training_time = self.total_log_batch_time = 0.0

    def record_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.writer.sample(metrics, step or 0)

    def flush(self) -> None:
        """Nothing held here: the writer sends."""


def _queued_monitor(writer: RunWriter) -> Any:
    """MLflow 3.17's `SystemMetricsMonitor` through the writer. Its own loop asks the server
    for the run after every sample and ends for good at the first failure (an outage stopped
    the samples, and a resume renumbered them); this one samples until `finish`, and the
    writer sends the samples when the store answers. A reopened run continues its steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class _QueuedMonitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()  # type: ignore[no-untyped-call]
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                self.publish_metrics(self.aggregate_metrics())  # type: ignore[no-untyped-call]

    monitor = _QueuedMonitor(  # type: ignore[no-untyped-call]
        writer.run_id,
        resume_logging=True,  # a reopened run continues its steps
        tracking_uri=writer.tracker.uri,
    )
    monitor.mlflow_logger = _ToWriter(writer)  # type: ignore[assignment]
    return monitor
