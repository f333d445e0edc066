"""Prefect tasks around one fold and one variant: train (or skip), log, aggregate.

Thin by design: the work is `agegender.train.train` on `adience_fold`; these tasks add slots,
retries that resume from the checkpoint, skip-if-finished, and the MLflow records.
"""

from __future__ import annotations

import json
import queue
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Run
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.logging.loggers import task_run_logger
from pydantic import BaseModel

from agegender import plots
from agegender.cache import build_cache, open_cache
from agegender.cli import EXPECTED
from agegender.config import CacheConfig, Config, deviations, flatten
from agegender.metrics import sample_std
from agegender.train import adience_fold, epoch_line, select_device, train
from tasks.tracking import Tracker, git_commit

# Devices that folds may occupy, one fold each at a time (set by the flow before it submits).
_slots: queue.Queue[str] = queue.Queue()
CPU_THREADS = torch.get_num_threads()  # torch's own choice (cores, or OMP_NUM_THREADS)


def set_slots(n: int) -> int:
    """n slots (0 = one per GPU, else 1); each is a device string a fold trains on.

    On a CPU the slots share the process's torch threads: each fold gets cores // n of them, so
    n folds never oversubscribe the cores (`suite.slots=2` on 2 cores: two folds with one thread
    each, faster than one fold on two threads, by far on a loaded machine, where the two threads
    wait on each other: `benchmarks/slots.py`), and one slot keeps every core. The thread count
    changes float sums, so runs compared number for number use the same slots."""
    gpus = torch.cuda.device_count()
    n = n or max(gpus, 1)
    while not _slots.empty():
        _slots.get_nowait()
    for i in range(n):
        _slots.put(f"cuda:{i % gpus}" if gpus else "cpu")
    if not gpus:  # one thread pool per process: the slots' threads share it
        torch.set_num_threads(max(1, CPU_THREADS // n))
    return n


def fold_device(requested: str, free: str) -> tuple[str, dict[str, str]]:
    """The device a run trains on, given its `train.device` and the slot it got, and the tags
    that say how it was chosen. A CUDA device asked for and missing is an error
    (`select_device`); only `auto` falls back to the CPU, and its tags then say so."""
    select_device(requested)
    tags = {"device_requested": requested}
    if requested == "auto":
        if free == "cpu":
            tags["device_fallback"] = "cpu: auto found no CUDA device"
        return free, tags
    if requested == "cuda" and free.startswith("cuda"):
        return free, tags  # the slot's GPU
    return requested, tags


@contextmanager
def slot() -> Iterator[str]:
    device = _slots.get()
    try:
        yield device
    finally:
        _slots.put(device)


def logged_progress(label: str, steps: int = 10) -> Callable[[int, int], None]:
    """A (done, total) callback that logs about `steps` lines with the throughput."""
    start = time.perf_counter()
    shown = [-1]

    def update(done: int, total: int) -> None:
        step = done * steps // max(total, 1)
        if step > shown[0]:
            shown[0] = step
            rate = done / max(time.perf_counter() - start, 1e-9)
            get_run_logger().info(f"{label}: {done:,}/{total:,} images ({rate:,.0f} img/s)")

    return update


@task(cache_policy=NO_CACHE)
def prepare_cache_task(data_root: str, cache_dir: str, image_size: int) -> str:
    """Decode-once cache of the data root (a no-op when it is up to date)."""
    res = build_cache(
        data_root,
        cache_dir,
        config=CacheConfig(image_size=image_size),
        progress=logged_progress("decoding Adience"),
    )
    get_run_logger().info(
        f"cache {cache_dir}: {res.images} images, decoded {res.decoded}, "
        f"skipped {len(res.problems)} (fingerprint {res.fingerprint[:12]})"
    )
    return cache_dir


def scalar_metrics(test: dict[str, Any]) -> dict[str, float]:
    """The per-fold numbers that get a mean and a std (accuracies, 1-off, their 10-crop twins)."""
    return {k: float(v) for k, v in test.items() if isinstance(v, float)}


def config_tags(config: Config, synthetic: bool) -> dict[str, str]:
    """What a table needs to say about a run: the preset it started from and how it differs,
    the split protocol, and whether the data were synthetic."""
    return {
        "preset": config.preset,
        "preset_deviations": ", ".join(deviations(config))[:4000] or "none",
        "protocol": config.data.split.protocol,
        "synthetic": str(synthetic).lower(),
    }


def fold_tags(
    suite: str, variant: str, fold: int, config: Config, fingerprint: str, synthetic: bool
) -> dict[str, str]:
    return {
        "suite": suite,
        "variant": variant,
        "fold": str(fold),
        "seed": str(config.train.seed),
        "task": config.train.task,
        "config_hash": config.hash(),
        "data_fingerprint": fingerprint,
        "kind": "fold",
    } | config_tags(config, synthetic)


class FoldJob(BaseModel):
    """One fold to train and where it is tracked: what the in-process task and the `train_fold`
    flow run (scale-out) both take, and what a deployment's parameters carry."""

    cache_dir: str
    fold: int
    variant: str
    config: dict[str, Any]
    run_root: str
    suite: str
    parent_id: str
    seed: int | None = None  # set when the suite repeats each fold (suite.seeds)

    @property
    def name(self) -> str:
        repeat = "" if self.seed is None else f"-seed{self.seed}"
        return f"{self.variant}-fold{self.fold}{repeat}"


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


@task(
    task_run_name="{job.variant}-fold{job.fold}",
    cache_policy=NO_CACHE,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_bad_input,
)
def train_fold_task(job: FoldJob) -> dict[str, Any]:
    """Train one fold unless an identical one already finished; log it as a child run."""
    cache_dir, fold, variant, run_root = job.cache_dir, job.fold, job.variant, job.run_root
    suite, parent_id = job.suite, job.parent_id
    log = get_run_logger()
    cfg = Config.model_validate(job.config)
    cache = open_cache(cache_dir)
    tracker = Tracker(suite, Path(run_root))
    tags = fold_tags(suite, variant, fold, cfg, cache.fingerprint, cache.synthetic)
    tags |= {"parent": parent_id}
    done = tracker.finished(tags)
    if done is not None:
        log.info(
            f"{variant} fold {fold}: already finished (config {cfg.hash()}, data "
            f"{cache.fingerprint[:8]}, run {done.info.run_id}); not trained again"
        )
        return {"variant": variant, "fold": fold, "run_id": done.info.run_id, "trained": False}
    out = Path(run_root) / suite / variant / f"fold{fold}-{cfg.hash()}-{cache.fingerprint[:8]}"
    finished = (out / "result.json").exists()  # trained, but killed before it was logged
    with slot() as free:
        device, device_tags = fold_device(cfg.train.device, free)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": device})})
        state = (
            "logging its finished result"
            if finished
            else ("resuming from its checkpoint" if (out / "last.pt").exists() else "training")
        )
        log.info(f"{variant} fold {fold}: {state} on {device} -> {out}")
        ts = adience_fold(cache, fold, cfg)
        for line in ts.about:
            log.info(f"{variant} {line}")
        result = train(
            ts,
            cfg,
            out,
            resume=True,
            log=lambda r: log.info(f"{variant} fold {fold}: {epoch_line(r)}"),
        )
    s = result.summary
    log.info(
        f"{variant} fold {fold}: test "
        + ", ".join(
            f"{k} {v:.3f}" for k, v in scalar_metrics(s["test"]).items() if "10crop" not in k
        )
    )
    run_id = tracker.start(
        f"{variant} fold {fold}",
        tags | device_tags | {"git_commit": git_commit(), "device": s["device"]},
        parent_id,
    )
    try:
        log_training(tracker, run_id, out, cfg, s, f"{cfg.train.task} fold {fold}")
    except BaseException:
        tracker.finish(run_id, status="FAILED")
        raise
    tracker.finish(run_id)
    return {"variant": variant, "fold": fold, "run_id": run_id, "trained": not finished}


@task(task_run_name="{job.variant}-fold{job.fold}", cache_policy=NO_CACHE)
def remote_fold_task(deployment: str, retries: int, job: FoldJob) -> dict[str, Any]:
    """One fold as a flow run of the `train_fold` deployment on a work pool. A run that fails,
    or that the server marked CRASHED (its heartbeats stopped: the worker or its machine died,
    wherever it was; deployments/automations.py), is started again and resumes from its
    checkpoint."""
    log = get_run_logger()
    name, params = job.name, {"job": job.model_dump(mode="json")}
    state = None
    for attempt in range(retries + 1):
        run = run_deployment(deployment, parameters=params, flow_run_name=name, timeout=0)
        assert isinstance(run, FlowRun)  # the sync call returns the run, not a coroutine
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run.id)
                state = run.state
                if state is not None and state.is_final():
                    break
                time.sleep(2)
        if state is not None and state.is_completed():
            log.info(f"{name}: flow run {run.name} ({run.id}) completed")
            return {
                "variant": job.variant,
                "fold": job.fold,
                "flow_run_id": str(run.id),
                "trained": True,
            }
        log.warning(f"{name}: flow run {run.id} ended {state and state.name} (try {attempt + 1})")
    raise RuntimeError(f"{name}: {retries + 1} flow runs of {deployment} failed ({state})")


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


def variant_table(values: dict[str, list[float]]) -> str:
    lines = ["| metric | mean | std (ddof=1) | folds |", "|---|---|---|---|"]
    for k, v in values.items():
        lines.append(
            f"| test_{k} | {np.mean(v):.4f} | {sample_std(v):.4f} | "
            + ", ".join(f"{x:.3f}" for x in v)
            + " |"
        )
    return "\n".join(lines)


def latest_folds(tracker: Tracker, parent_id: str) -> dict[tuple[int, int], Run]:
    """(fold, seed) -> the parent's newest FINISHED run of it (a rerun after a crash logs a
    second one)."""
    latest: dict[tuple[int, int], Run] = {}
    for child in sorted(tracker.children(parent_id), key=lambda r: r.info.start_time):
        tags = child.data.tags
        seed = tags.get("seed", child.data.params.get("train.seed", "0"))
        latest[(int(tags["fold"]), int(seed))] = child
    return dict(sorted(latest.items()))


def per_fold(latest: dict[tuple[int, int], Run]) -> dict[int, dict[str, float]]:
    """fold -> its test metrics and sizes, averaged over the fold's seeds (repeats are averaged
    per fold first, so the statistics across folds still see one number per fold)."""
    runs: dict[int, list[dict[str, float]]] = {}
    for (fold, _), run in latest.items():
        runs.setdefault(fold, []).append(dict(run.data.metrics))
    out: dict[int, dict[str, float]] = {}
    for fold, metrics in runs.items():
        keys = set.intersection(*(set(m) for m in metrics))
        out[fold] = {k: float(np.mean([m[k] for m in metrics])) for k in sorted(keys)}
        out[fold]["seeds"] = len(metrics)
    return out


@task(task_run_name="aggregate-{variant}", cache_policy=NO_CACHE)
def aggregate_task(variant: str, suite: str, run_root: str, parent_id: str) -> dict[str, Any]:
    """Mean and sample std across the parent's finished folds, a bar chart and a table."""
    tracker = Tracker(suite, Path(run_root))
    by_fold = per_fold(latest_folds(tracker, parent_id))
    folds = [str(k) for k in by_fold]
    values: dict[str, list[float]] = {}
    for metrics in by_fold.values():
        for k, v in metrics.items():
            if k.startswith("test_"):
                values.setdefault(k[5:], []).append(v)
    values = {k: v for k, v in values.items() if len(v) == len(folds)}
    sizes = {
        k: [m[k] for m in by_fold.values()]
        for k in ("n_train", "n_test", "seeds")
        if all(k in m for m in by_fold.values())
    }
    metrics = {f"test_{k}_mean": float(np.mean(v)) for k, v in values.items()}
    metrics |= {f"test_{k}_std": sample_std(v) for k, v in values.items() if len(v) > 1}
    tracker.log(parent_id, metrics=metrics | {"folds": len(folds)})
    with tempfile.TemporaryDirectory() as tmp:
        main = {f"test_{k}": v for k, v in values.items() if "10crop" not in k}
        plots.fold_bars(main, Path(tmp) / "fold_bars.png", f"{variant}: test metrics per fold")
        tracker.artifact(parent_id, Path(tmp) / "fold_bars.png")
    tracker.text(
        parent_id,
        f"# {variant}\n\nfolds {', '.join(folds)}\n\n{variant_table(values)}\n",
        "results.md",
    )
    tracker.finish(parent_id)
    return {
        "variant": variant,
        "folds": [int(f) for f in folds],
        "values": values,
        "sizes": sizes,
        "parent_id": parent_id,
    }
