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

from agegender.cache import build_source_cache, open_source_cache
from agegender.config import CacheConfig, Config, PretrainConfig
from agegender.pretrain import source_set
from agegender.train import epoch_line, train
from tasks.folds import (
    config_tags,
    fold_device,
    log_training,
    logged_progress,
    retry_unless_bad_input,
    scalar_metrics,
    slot,
)
from tasks.tracking import Tracker, git_commit

CHECKPOINT_FOLDER = "checkpoint"


def registered_name(source: str) -> str:
    return f"agegender-pretrained-{source}"


@task(
    task_run_name="pretrain-{pretrain[source]}",
    cache_policy=NO_CACHE,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_bad_input,
)
def pretrain_task(
    pretrain: dict[str, Any],
    config: dict[str, Any],
    run_root: str,
    experiment: str,
    image_size: int,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Pretrain on the source unless an identical run finished; log and register it."""
    log = get_run_logger()
    p, cfg = PretrainConfig.model_validate(pretrain), Config.model_validate(config)
    if p.root is None:
        raise ValueError(
            f"pretrain.root is not set: give the {p.source} download (its official layout)"
        )
    cache_path = Path(cache_dir) if cache_dir else Path(run_root) / f"cache-{p.source}"
    res = build_source_cache(
        p.source,
        p.root,
        cache_path,
        CacheConfig(image_size=image_size),
        progress=logged_progress(f"decoding {p.source}"),
    )
    log.info(
        f"{p.source} cache {cache_path}: {res.images} images, decoded {res.decoded}, "
        f"skipped {len(res.problems)} (listed in {cache_path / 'report.tsv'})"
    )
    cache = open_source_cache(cache_path)
    ts = source_set(cache, cfg, p)
    tracker = Tracker(experiment, Path(run_root))
    tags = {
        "kind": "pretrain",
        "source": p.source,
        "trained_on": ts.name,
        "config_hash": cfg.hash(),
        "data_fingerprint": cache.fingerprint,
    } | config_tags(cfg, cache.synthetic)
    name = registered_name(p.source)
    out = Path(run_root, experiment, "pretrain", f"{p.source}-{cfg.hash()}-{cache.fingerprint[:8]}")
    done = tracker.finished(tags)
    if done is not None:
        run_id = str(done.info.run_id)
        version = tracker.register(run_id, CHECKPOINT_FOLDER, name, tags)
        checkpoint = out / "best.pt"
        if not (out / "result.json").exists():  # trained elsewhere: fetch the logged weights
            got = tracker.download(
                f"runs:/{run_id}/{CHECKPOINT_FOLDER}/best.pt",
                Path(run_root) / "pretrained" / run_id,
            )
            checkpoint = got
        log.info(
            f"pretraining on {ts.name}: already finished (run {run_id}, models:/{name}/{version});"
            " not trained again"
        )
        test = {k[5:]: v for k, v in done.data.metrics.items() if k.startswith("test_")}
        return _result(run_id, checkpoint, name, version, test, trained=False)
    with slot() as free:
        device, device_tags = fold_device(cfg.train.device, free)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": device})})
        log.info(f"pretraining on {ts.name} ({len(cache)} images) on {device} -> {out}")
        result = train(
            ts, cfg, out, resume=True, log=lambda r: log.info(f"pretrain: {epoch_line(r)}")
        )
    s = result.summary
    log.info(
        f"pretraining on {ts.name}: test "
        + ", ".join(f"{k} {v:.3f}" for k, v in scalar_metrics(s["test"]).items())
    )
    run_id = tracker.start(
        f"pretrain {p.source}",
        tags | device_tags | {"git_commit": git_commit(), "device": s["device"]},
    )
    try:
        tracker.log(run_id, params={f"pretrain.{k}": v for k, v in pretrain.items()})
        log_training(tracker, run_id, out, cfg, s, f"pretrain {p.source}", CHECKPOINT_FOLDER)
        version = tracker.register(run_id, CHECKPOINT_FOLDER, name, tags)
        tracker.log(run_id, tags={"registered_model": f"models:/{name}/{version}"})
    except BaseException:
        tracker.finish(run_id, status="FAILED")
        raise
    tracker.finish(run_id)
    return _result(run_id, out / "best.pt", name, version, scalar_metrics(s["test"]), True)


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
