"""The paper's experiments as Prefect flows: every fold of every variant, tracked in MLflow.

`suite` prepares the cache, gets the pretrained backbone when `multitask_pretrained` is asked
for (pretraining first, once, when no checkpoint is given), fans out variants x folds as tasks
on a thread pool bounded by the slots (folds carry their own generators, so results do not
depend on scheduling), registers each variant's best fold (by validation) as
`agegender-<variant>@champion`, aggregates each variant's folds into its parent run and writes
the comparison tables as a summary run. `cross_validate` is the same for one variant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from agegender.cache import open_cache
from agegender.config import Config, Variant, flatten
from flows.fold import remote_fold_task, tag_this_run
from flows.settings import SuiteRun, run_tags
from tasks.artifacts import publish
from tasks.cache import prepare_cache_task
from tasks.compare import compare_task
from tasks.folds import FoldJob, aggregate_task, train_fold_task
from tasks.pretrain import PretrainJob, pretrain_task, resolve_pretrained_task
from tasks.registry import register_champion_task
from tasks.slots import set_slots
from tracking.schema import backbone_tags, parent_note, parent_tags
from tracking.store import Tracker


def _backbone(suite: SuiteRun, base: Config, run_root: str) -> PrefectFuture[dict[str, Any]]:
    """Start getting multitask_pretrained's checkpoint. Submitted before any fold: pretraining,
    the longest single job, then takes the first free slot and trains beside the folds."""
    if suite.pretrained is not None:
        return resolve_pretrained_task.submit(suite.pretrained, run_root, suite.name)
    job = PretrainJob(
        pretrain=suite.pretrain,
        config=base,
        run_root=run_root,
        experiment=suite.name,
        image_size=suite.image_size,
    )
    task = pretrain_task.with_options(
        retries=suite.retries, tags=[*run_tags(suite.name), "pretrain"]
    )
    return task.submit(job)  # as a fold: resumes


def _run(suite: SuiteRun, base: Config, cache_dir: str, run_root: str) -> dict[str, Any]:
    log = get_run_logger()
    tracker = Tracker(suite.name, Path(run_root))
    cache = open_cache(cache_dir)
    fingerprint, synthetic = cache.fingerprint, cache.synthetic
    job_cache, job_root = cache_dir, run_root
    if suite.mode == "deployments":  # workers anywhere: paths must mean the same there
        job_cache, job_root = str(Path(cache_dir).resolve()), str(Path(run_root).resolve())
    seeds: list[int | None] = list(suite.seeds) if suite.seeds is not None else [None]
    configs: dict[str, Config] = {}
    parents: dict[str, str] = {}
    futures = []

    def submit(v: str, cfg: Config, extra: dict[str, str]) -> None:
        configs[v] = cfg
        repeats = suite.seeds or [cfg.train.seed]
        tags = parent_tags(suite.name, v, cfg, fingerprint, synthetic, repeats)
        note = parent_note(suite.name, v, cfg, repeats)
        parents[v], new = tracker.find_or_start(v, tags, extra | note)
        if new:  # the UI compares the variants' params
            tracker.log(parents[v], params=flatten(cfg.model_dump(mode="json")))
        labels = run_tags(suite.name, v)
        for k, seed in [(k, s) for k in suite.folds for s in seeds]:
            c = cfg
            if seed is not None:
                c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
            job = FoldJob(
                cache_dir=job_cache,
                fold=k,
                variant=v,
                config=c,
                run_root=job_root,
                suite=suite.name,
                parent_id=parents[v],
                seed=seed,
            )
            if suite.mode == "deployments":
                remote = remote_fold_task.with_options(tags=labels)
                futures.append(remote.submit(suite.deployment, suite.retries, job, suite.requeues))
            else:
                local = train_fold_task.with_options(retries=suite.retries, tags=labels)
                futures.append(local.submit(job))

    # Pretraining (it holds a slot like a fold) trains beside the folds that need no backbone,
    # not before them all; the folds that start from its weights follow it.
    pending = _backbone(suite, base, run_root) if "multitask_pretrained" in suite.variants else None
    for v in suite.variants:
        if v != "multitask_pretrained":
            submit(v, suite.variant_config(base, v, None), {})
    if pending is not None:
        got = pending.result()
        v = "multitask_pretrained"
        config = suite.variant_config(base, v, Path(got["checkpoint"]))
        submit(v, config, backbone_tags(suite.pretrained or got["model_uri"], got["run_id"]))
    configs = {v: configs[v] for v in suite.variants}
    parents = {v: parents[v] for v in suite.variants}
    results = [f.result() for f in futures]
    trained = sum(bool(r["trained"]) for r in results)
    log.info(f"{trained} fold(s) trained, {len(results) - trained} already finished and skipped")
    registered = {
        v: register_champion_task(v, suite.name, run_root, parents[v])
        for v in (suite.variants if suite.register_champions else [])
    }
    aggregates: dict[str, dict[str, Any]] = {
        v: aggregate_task(v, suite.name, run_root, parents[v]) for v in suite.variants
    }
    summary = compare_task(
        aggregates, suite, configs, cache.image_size, synthetic, run_root, cache.resize
    )
    champions: dict[str, dict[str, Any]] = {v: c for v, c in registered.items() if c}
    publish(tracker, summary, aggregates, parents, champions)
    return {
        "summary": summary,
        "parents": parents,
        "champions": champions,
        "trained": trained,
        "skipped": len(results) - trained,
        "experiment_id": tracker.experiment_id,
        "ui": tracker.ui_command(),
    }


def _suite_name(suite: Any) -> str:
    """The suite's name from its parameter: a `SuiteRun`, or the JSON a deployment sent."""
    if isinstance(suite, SuiteRun):
        return suite.name
    if isinstance(suite, dict) and isinstance(suite.get("name"), str):
        return str(suite["name"])
    return str(SuiteRun.model_fields["name"].default)


def suite_run_name() -> str:
    """`<suite>-<UTC date and time>` (`agegender-2026-11-30-0712`): runs of one suite sort by
    date in the UI's list instead of being random adjective-animal pairs."""
    from prefect.runtime import flow_run

    name = _suite_name(flow_run.parameters.get("suite"))
    return f"{name}-{_stamp()}"


def _stamp() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d-%H%M}"


def cross_validate_run_name() -> str:
    """`<suite>-<variant>-<UTC date and time>`."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"{_suite_name(params.get('suite'))}-{params.get('variant', 'multitask')}-{_stamp()}"


@flow(name="suite", flow_run_name=suite_run_name, log_prints=True)
def suite_flow(
    cache_dir: str = "runs/suite/cache",
    suite: SuiteRun | None = None,
    config: Config | None = None,
    run_root: str = "runs/suite",
    data_root: str | None = None,
) -> dict[str, Any]:
    """Every fold of every variant, tracked in MLflow; results as this run's artifacts.

    Args:
        cache_dir: the decoded Adience cache (built there first when `data_root` is given).
        suite: the config file's `suite` section: what to train (variants, folds, seeds,
            pretraining) and how (mode, retries, slots); its `name` is the MLflow experiment.
            Null means the defaults, whose multitask_pretrained needs suite.pretrain.root or
            suite.pretrained.
        config: the config file's library sections (data, model, optim, train), on top of
            its `preset` (default `paper`); null = the paper preset.
        run_root: checkpoints, results and (without MLFLOW_TRACKING_URI) the local MLflow store.
        data_root: an Adience download to build the cache from; null = the cache is ready.
    """
    s, base = suite or SuiteRun(), config or Config()
    tag_this_run(*run_tags(s.name))
    set_slots(s.slots)
    if data_root is not None:
        prepare_cache_task(data_root, cache_dir, s.image_size, s.resize)
    return _run(s, base, cache_dir, run_root)


@flow(name="cross_validate", flow_run_name=cross_validate_run_name, log_prints=True)
def cross_validate(
    variant: Variant = "multitask",
    cache_dir: str = "runs/suite/cache",
    suite: dict[str, Any] | None = None,
    config: Config | None = None,
    run_root: str = "runs/suite",
) -> dict[str, Any]:
    """One variant's folds, tracked as the suite's are.

    Args:
        variant: the variant to cross-validate.
        cache_dir: the decoded Adience cache.
        suite: a suite section without its variants, as JSON (folds, seeds, name, mode,
            retries...; see the suite flow's `suite`). A dict on purpose: the default
            variants would ask for a backbone this variant may not need, so it is validated
            here, once, with `variant`.
        config: the config file's library sections on top of its `preset` (default `paper`).
        run_root: checkpoints, results and (without MLFLOW_TRACKING_URI) the local MLflow store.
    """
    s = SuiteRun.model_validate((suite or {}) | {"variants": [variant]})
    tag_this_run(*run_tags(s.name, variant))
    set_slots(s.slots)
    return _run(s, config or Config(), cache_dir, run_root)


def run_suite(
    suite: SuiteRun, base: Config, cache_dir: Path, run_root: Path, data_root: Path | None = None
) -> dict[str, Any]:
    """Run the suite flow with as many task threads as slots."""
    slots = set_slots(suite.slots)
    if suite.mode == "deployments":  # threads only wait for the folds' flow runs
        slots = len(suite.variants) * len(suite.folds)
    runner = ThreadPoolTaskRunner(max_workers=slots)  # type: ignore[var-annotated]
    return suite_flow.with_options(task_runner=runner)(  # type: ignore[arg-type]
        str(cache_dir), suite, base, str(run_root), str(data_root) if data_root else None
    )
