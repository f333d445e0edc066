"""Prefect tasks for the pretrained backbone: pretrain once (or reuse), or fetch a given one.

Pretraining is cached like a fold: a FINISHED MLflow run with the same source, split, config
hash and data fingerprint is reused, a killed one resumes from its checkpoint. Its `best.pt` is
logged under `checkpoint/` and registered as a version of `agegender-pretrained-<source>`, so
later suites can start from `models:/agegender-pretrained-celeba/1` on any machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from agegender.cache import build_source_cache, open_source_cache
from agegender.config import CacheConfig, Config, PretrainConfig, flatten
from agegender.pretrain import source_set
from tasks.cache import logged_progress
from tasks.training import TrackedRun, retry_unless_bad_input, scalar_metrics, train_tracked
from tracking.schema import pretrain_note, pretrain_tags, pretrained_descriptions, registered_tag
from tracking.store import Tracker

CHECKPOINT_FOLDER = "checkpoint"


def registered_name(source: str) -> str:
    return f"agegender-pretrained-{source}"


class PretrainJob(BaseModel):
    """Pretraining to run and where it is kept: what the suite's task and the `pretrain` flow
    both take. `config` is the base config; `pretrain.overrides` go on top of it."""

    pretrain: PretrainConfig
    config: Config
    run_root: str
    experiment: str = "agegender"  # the MLflow experiment (= suite.name)
    image_size: int = 256  # the cached images' side
    cache_dir: str | None = None  # default RUN_ROOT/cache-SOURCE


@task(
    task_run_name="pretrain-{job.pretrain.source}",
    cache_policy=NO_CACHE,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_bad_input,
)
def pretrain_task(job: PretrainJob) -> dict[str, Any]:
    """Pretrain on the source unless an identical run finished; log and register it."""
    log = get_run_logger()
    p, run_root, experiment = job.pretrain, job.run_root, job.experiment
    cfg = p.train_config(job.config)
    if p.root is None:
        raise ValueError(
            f"pretrain.root is not set: give the {p.source} download (its official layout)"
        )
    cache_path = Path(job.cache_dir) if job.cache_dir else Path(run_root) / f"cache-{p.source}"
    res = build_source_cache(
        p.source,
        p.root,
        cache_path,
        CacheConfig(image_size=job.image_size),
        progress=logged_progress(f"decoding {p.source}"),
    )
    log.info(
        f"{p.source} cache {cache_path}: {res.images} images, decoded {res.decoded}, "
        f"skipped {len(res.problems)} (listed in {cache_path / 'report.tsv'})"
    )
    cache = open_source_cache(cache_path)
    ts = source_set(cache, cfg, p)
    tracker = Tracker(experiment, Path(run_root))
    tags = pretrain_tags(p.source, ts.name, cfg, cache.fingerprint, cache.synthetic)
    name = registered_name(p.source)
    out = Path(run_root, experiment, "pretrain", f"{p.source}-{cfg.hash()}-{cache.fingerprint[:8]}")
    done = tracker.finished(tags)
    if done is not None:
        version = tracker.register(done.run_id, CHECKPOINT_FOLDER, name, tags)
        checkpoint = out / "best.pt"
        if not (out / "result.json").exists():  # trained elsewhere: fetch the logged weights
            checkpoint = tracker.download(
                f"runs:/{done.run_id}/{CHECKPOINT_FOLDER}/best.pt",
                Path(run_root) / "pretrained" / done.run_id,
            )
        log.info(
            f"pretraining on {ts.name}: already finished (run {done.run_id}, "
            f"models:/{name}/{version}); not trained again"
        )
        return _result(done.run_id, checkpoint, name, version, done.test_metrics(), False)
    versions: list[str] = []

    def register(run_id: str) -> None:
        params = flatten(p.model_dump(mode="json"), "pretrain.")
        tracker.log(run_id, params=params, tags=pretrain_note(p.source, ts.name))
        test = tracker.get(run_id).test_metrics()
        texts = pretrained_descriptions(p.source, ts.name, run_id, test)
        versions.append(tracker.register(run_id, CHECKPOINT_FOLDER, name, tags, texts))
        tracker.log(run_id, tags=registered_tag(f"models:/{name}/{versions[0]}"))

    run = TrackedRun(tracker, f"pretrain {p.source}", tags, out, None, CHECKPOINT_FOLDER)
    got = train_tracked(run, ts, cfg, also=register)
    test = scalar_metrics(got.summary["test"])
    return _result(got.run_id, out / "best.pt", name, versions[0], test, True)


def _result(
    run_id: str, checkpoint: Path, name: str, version: str, test: dict[str, float], trained: bool
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "checkpoint": str(checkpoint),
        "model_uri": f"models:/{name}/{version}",
        "test": test,
        "trained": trained,
    }


@task(cache_policy=NO_CACHE)
def resolve_pretrained_task(pretrained: str, run_root: str, experiment: str) -> dict[str, Any]:
    """A given backbone as a local `best.pt`: a path, or a run's / model version's artifacts."""
    if not pretrained.startswith(("runs:/", "models:/")):
        path = Path(pretrained)
        path = path / "best.pt" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"suite.pretrained={pretrained}: no such file; expected a best.pt checkpoint, "
                "runs:/RUN_ID/PATH or models:/NAME/VERSION (or @ALIAS)"
            )
        return {"checkpoint": str(path), "run_id": None, "model_uri": None}
    tracker = Tracker(experiment, Path(run_root))
    run_id = tracker.run_of(pretrained)
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", pretrained)
    local = tracker.download(pretrained, Path(run_root) / "pretrained" / folder)
    found = [local] if local.is_file() else sorted(local.rglob("best.pt"))
    if not found:
        raise FileNotFoundError(f"suite.pretrained={pretrained}: holds no best.pt ({local})")
    get_run_logger().info(f"backbone from {pretrained} (run {run_id}) -> {found[0]}")
    return {
        "checkpoint": str(found[0]),
        "run_id": run_id,
        "model_uri": pretrained if pretrained.startswith("models:/") else None,
    }
