"""Prefect tasks around one fold and one variant: train (or skip) a fold, aggregate a variant.

Thin by design: the work is `agegender.train.train` on `adience_fold` (through the shared
`tasks.training` skeleton); these tasks name the fold's run and add skip-if-finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from agegender import plots
from agegender.cache import open_cache
from agegender.config import Config
from agegender.metrics import sample_std
from agegender.report import is_interval, variant_table
from agegender.train import adience_fold
from tasks.training import TrackedRun, retry_unless_bad_input, train_tracked
from tracking.schema import NOTE, RunRecord, fold_tags, results_tags
from tracking.store import Tracker


class FoldJob(BaseModel):
    """One fold to train and where it is tracked: what the in-process task and the `train_fold`
    flow run (scale-out) both take, and what a deployment's parameters carry."""

    cache_dir: str
    fold: int
    variant: str
    config: Config
    run_root: str
    suite: str
    parent_id: str
    seed: int | None = None  # set when the suite repeats each fold (suite.seeds)

    @property
    def name(self) -> str:
        repeat = "" if self.seed is None else f"-seed{self.seed}"
        return f"{self.variant}-fold{self.fold}{repeat}"


@task(
    task_run_name="{job.variant}-fold{job.fold}",
    cache_policy=NO_CACHE,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_bad_input,
)
def train_fold_task(job: FoldJob) -> dict[str, Any]:
    """Train one fold unless an identical one already finished; log it as a child run."""
    cfg, fold, variant = job.config, job.fold, job.variant
    cache = open_cache(job.cache_dir)
    tracker = Tracker(job.suite, Path(job.run_root))
    tags = fold_tags(
        job.suite, variant, fold, cfg, cache.fingerprint, cache.synthetic, job.parent_id
    )
    done = tracker.finished(tags)
    if done is not None:
        get_run_logger().info(
            f"{variant} fold {fold}: already finished (config {cfg.hash()}, data "
            f"{cache.fingerprint[:8]}, run {done.run_id}); not trained again"
        )
        return {"variant": variant, "fold": fold, "run_id": done.run_id, "trained": False}
    out = Path(job.run_root, job.suite, variant, f"fold{fold}-{cfg.hash()}-{cache.fingerprint[:8]}")
    run = TrackedRun(tracker, f"{variant} fold {fold}", tags, out, job.parent_id)
    got = train_tracked(run, adience_fold(cache, fold, cfg), cfg)
    return {"variant": variant, "fold": fold, "run_id": got.run_id, "trained": got.trained}


def per_fold(latest: dict[tuple[int, int], RunRecord]) -> dict[int, dict[str, float]]:
    """fold -> its test metrics and sizes, averaged over the fold's seeds (repeats are averaged
    per fold first, so the statistics across folds still see one number per fold)."""
    runs: dict[int, list[dict[str, float]]] = {}
    for (fold, _), run in latest.items():
        runs.setdefault(fold, []).append(dict(run.metrics))
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
    by_fold = per_fold(tracker.latest_folds(parent_id))
    folds = [str(k) for k in by_fold]
    values: dict[str, list[float]] = {}
    for metrics in by_fold.values():
        for k, v in metrics.items():
            if k.startswith("test_"):
                values.setdefault(k[5:], []).append(v)
    values = {k: v for k, v in values.items() if len(v) == len(folds)}
    # a fold's bounds are not numbers to average across folds: they go to their own table
    intervals = {k: values.pop(k) for k in [k for k in values if is_interval(k)]}
    sizes = {
        k: [m[k] for m in by_fold.values()]
        for k in ("n_train", "n_test", "seeds")
        if all(k in m for m in by_fold.values())
    }
    metrics = {f"test_{k}_mean": float(np.mean(v)) for k, v in values.items()}
    metrics |= {f"test_{k}_std": sample_std(v) for k, v in values.items() if len(v) > 1}
    note = tracker.get(parent_id).tags.get(NOTE, "")
    tracker.log(
        parent_id, metrics=metrics, tags=results_tags(note, folds, variant_table(values, intervals))
    )
    with tempfile.TemporaryDirectory() as tmp:
        main = {f"test_{k}": v for k, v in values.items() if "10crop" not in k}
        plots.fold_bars(main, Path(tmp) / "fold_bars.png", f"{variant}: test metrics per fold")
        tracker.artifact(parent_id, Path(tmp) / "fold_bars.png")
    tracker.text(
        parent_id,
        f"# {variant}\n\nfolds {', '.join(folds)}\n\n{variant_table(values, intervals)}\n",
        "results.md",
    )
    tracker.finish(parent_id)
    return {
        "variant": variant,
        "folds": [int(f) for f in folds],
        "values": values,
        "intervals": intervals,
        "sizes": sizes,
        "parent_id": parent_id,
    }
