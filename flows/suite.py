"""The paper's experiments as Prefect flows: every fold of every variant, tracked in MLflow.

`suite` prepares the cache, fans out variants x folds as tasks on a thread pool bounded by the
slots (folds carry their own generators, so results do not depend on scheduling), aggregates each
variant's folds into its parent run and writes the comparison tables as a summary run.
`cross_validate` is the same for one variant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

for _var, _value in (("DO_NOT_TRACK", "true"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
    os.environ.setdefault(_var, _value)

import numpy as np  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from scipy import stats  # noqa: E402

from agegender import plots  # noqa: E402
from agegender.cache import build_cache, open_cache  # noqa: E402
from agegender.config import CacheConfig, Config, SuiteConfig, Variant  # noqa: E402
from tasks.folds import aggregate_task, set_slots, train_fold_task  # noqa: E402
from tasks.tracking import Tracker  # noqa: E402

# Published 5-fold results on Adience (mean, std), for the benchmark table. Not our runs.
PUBLISHED: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {
    "levi_hassner": (
        "Levi & Hassner 2015 (over-sampling)",
        {"age_acc": (0.507, 0.051), "age_1off": (0.847, 0.022), "gender_acc": (0.868, 0.014)},
    ),
    "eidinger": (
        "Eidinger et al. 2014 (dropout-SVM)",
        {"age_acc": (0.451, 0.026), "age_1off": (0.795, 0.014), "gender_acc": (0.778, 0.013)},
    ),
}
METRICS = ("age_acc", "age_1off", "gender_acc")


@task(cache_policy=NO_CACHE)
def prepare_cache_task(data_root: str, cache_dir: str, image_size: int) -> str:
    """Decode-once cache of the data root (a no-op when it is up to date)."""
    res = build_cache(data_root, cache_dir, config=CacheConfig(image_size=image_size))
    get_run_logger().info(
        f"cache {cache_dir}: {res.images} images, decoded {res.decoded}, "
        f"skipped {len(res.problems)} (fingerprint {res.fingerprint[:12]})"
    )
    return cache_dir


def _parent(
    tracker: Tracker, suite: SuiteConfig, variant: str, config: Config, fingerprint: str
) -> str:
    tags = {
        "suite": suite.name,
        "variant": variant,
        "kind": "parent",
        "config_hash": config.hash(),
        "data_fingerprint": fingerprint,
        "task": config.train.task,
        "protocol": config.data.split.protocol,
    }
    found = tracker.find(tags, finished_only=False)
    if found is not None:
        return str(found.info.run_id)
    if variant == "multitask_pretrained":
        tags["pretrained_from"] = str(suite.pretrained)
    return tracker.start(variant, tags)


def _run(suite: SuiteConfig, base: Config, cache_dir: str, run_root: str) -> dict[str, Any]:
    log = get_run_logger()
    tracker = Tracker(suite.name, Path(run_root))
    fingerprint = open_cache(cache_dir).fingerprint
    configs = {v: suite.variant_config(base, v) for v in suite.variants}
    parents = {v: _parent(tracker, suite, v, c, fingerprint) for v, c in configs.items()}
    futures = [
        train_fold_task.with_options(retries=suite.retries).submit(
            cache_dir, k, v, configs[v].model_dump(mode="json"), run_root, suite.name, parents[v]
        )
        for v in suite.variants
        for k in suite.folds
    ]
    results = [f.result() for f in futures]
    trained = sum(r["trained"] for r in results)
    log.info(f"{trained} fold(s) trained, {len(results) - trained} already finished and skipped")
    aggregates: dict[str, dict[str, Any]] = {
        v: aggregate_task(v, suite.name, run_root, parents[v]) for v in suite.variants
    }
    summary = summarize(aggregates, base.data.split.protocol)
    _log_summary(tracker, suite, aggregates, summary, run_root)
    return {
        "summary": summary,
        "parents": parents,
        "trained": trained,
        "skipped": len(results) - trained,
        "experiment_id": tracker.experiment_id,
        "ui": tracker.ui_command(),
    }


@flow(name="suite", log_prints=True)
def suite_flow(
    cache_dir: str,
    suite: dict[str, Any],
    config: dict[str, Any],
    run_root: str,
    data_root: str | None = None,
) -> dict[str, Any]:
    s, base = SuiteConfig.model_validate(suite), Config.model_validate(config)
    if data_root is not None:
        prepare_cache_task(data_root, cache_dir, s.image_size)
    return _run(s, base, cache_dir, run_root)


@flow(name="cross_validate", log_prints=True)
def cross_validate(
    variant: Variant, cache_dir: str, suite: dict[str, Any], config: dict[str, Any], run_root: str
) -> dict[str, Any]:
    s = SuiteConfig.model_validate(suite | {"variants": [variant]})
    return _run(s, Config.model_validate(config), cache_dir, run_root)


def run_suite(
    suite: SuiteConfig, base: Config, cache_dir: Path, run_root: Path, data_root: Path | None = None
) -> dict[str, Any]:
    """Run the suite flow with as many task threads as slots."""
    slots = set_slots(suite.slots)
    runner = ThreadPoolTaskRunner(max_workers=slots)  # type: ignore[var-annotated]
    return suite_flow.with_options(task_runner=runner)(  # type: ignore[arg-type]
        str(cache_dir),
        suite.model_dump(mode="json"),
        base.model_dump(mode="json"),
        str(run_root),
        str(data_root) if data_root else None,
    )


def _ttest(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value (NaN when undefined: < 2 folds or no variance)."""
    if len(a) < 2 or np.allclose(np.subtract(a, b), np.mean(np.subtract(a, b))):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def _fmt(values: list[float]) -> str:
    std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
    return f"{100 * np.mean(values):.1f} ± {100 * std:.1f}"


def summarize(aggregates: dict[str, dict[str, Any]], protocol: str) -> dict[str, Any]:
    """The seed's three tables, done right: mean ± sample std over folds, paired t-tests."""
    vals = {v: a["values"] for v, a in aggregates.items()}
    folds = {v: a["folds"] for v, a in aggregates.items()}
    lines = [f"Protocol: {protocol}. Accuracies in %, mean ± sample std (ddof=1) over folds.", ""]
    tables: dict[str, list[dict[str, Any]]] = {}

    if "multitask" in vals:
        rows = []
        lines += [
            "## Benchmark: multi-task from scratch vs published",
            "",
            "| | age exact | age 1-off | gender |",
            "|---|---|---|---|",
        ]
        for name, suffix in (("ours, centre crop", ""), ("ours, 10-crop", "_10crop")):
            cells = [
                _fmt(vals["multitask"][m + suffix]) if m + suffix in vals["multitask"] else "-"
                for m in METRICS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for key, (name, ref) in PUBLISHED.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{100 * ref[m][0]:.1f} ± {100 * ref[m][1]:.1f}" for m in METRICS)
                + " |"
            )
            for m in METRICS:
                ours = vals["multitask"].get(m + "_10crop", vals["multitask"].get(m))
                if ours and len(ours) > 1:
                    p = float(stats.ttest_1samp(ours, ref[m][0]).pvalue)
                    rows.append(
                        {"key": f"p_ours_vs_{key}_{m}", "reference": name, "metric": m, "p": p}
                    )
        lines += [
            "",
            "(published numbers are theirs, not re-run; p-values: one-sample t-test of "
            "our folds, 10-crop when measured, against the published mean)",
            "",
        ]
        lines += [f"- {r['metric']} vs {r['reference']}: p = {r['p']:.3g}" for r in rows]
        lines.append("")
        tables["benchmark"] = rows

    pairs: list[tuple[str, str, list[tuple[str, str, str, str, str]]]] = []
    if {"multitask", "multitask_pretrained"} <= vals.keys():
        pairs.append(
            (
                "Pretrained vs from scratch",
                "pretrained_vs_scratch",
                [(m, "multitask_pretrained", m, "multitask", m) for m in METRICS],
            )
        )
    if "multitask" in vals and ({"age", "gender"} & vals.keys()):
        pairs.append(
            (
                "Multi-task vs single-task",
                "multitask_vs_single",
                [
                    (m, "multitask", m, single, m)
                    for m, single in (
                        ("age_acc", "age"),
                        ("age_1off", "age"),
                        ("gender_acc", "gender"),
                    )
                    if single in vals
                ],
            )
        )
    for title, prefix, comparisons in pairs:
        rows = []
        lines += [
            f"## {title}",
            "",
            "| metric | A | mean ± std | B | mean ± std | paired p |",
            "|---|---|---|---|---|---|",
        ]
        for metric, va, ma, vb, mb in comparisons:
            common = sorted(set(folds[va]) & set(folds[vb]))
            a = [vals[va][ma][folds[va].index(k)] for k in common]
            b = [vals[vb][mb][folds[vb].index(k)] for k in common]
            p = _ttest(a, b)
            rows.append(
                {
                    "key": f"p_{prefix}_{metric}",
                    "metric": metric,
                    "a": va,
                    "b": vb,
                    "mean_a": float(np.mean(a)),
                    "mean_b": float(np.mean(b)),
                    "p": p,
                    "folds": common,
                }
            )
            lines.append(f"| {metric} | {va} | {_fmt(a)} | {vb} | {_fmt(b)} | {p:.3g} |")
        lines.append("")
        tables[title] = rows
    return {"markdown": "\n".join(lines), "tables": tables, "protocol": protocol}


def _log_summary(
    tracker: Tracker,
    suite: SuiteConfig,
    aggregates: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    run_root: str,
) -> None:
    tags = {"suite": suite.name, "kind": "summary"}
    found = tracker.find(tags, finished_only=False)
    run_id = str(found.info.run_id) if found else tracker.start("summary", tags)
    tracker.text(run_id, summary["markdown"], "summary.md")
    p_values = {r["key"]: r["p"] for rows in summary["tables"].values() for r in rows}
    tracker.log(run_id, metrics={k: p for k, p in p_values.items() if not np.isnan(p)})
    groups = {
        v: {
            m: (float(np.mean(a["values"][m])), float(np.std(a["values"][m], ddof=1)))
            for m in METRICS
            if m in a["values"] and len(a["values"][m]) > 1
        }
        for v, a in aggregates.items()
    }
    groups |= {name: dict(ref) for name, ref in PUBLISHED.values()}
    path = Path(run_root) / suite.name / "compare.png"
    plots.compare_bars(groups, path, f"{suite.name}: mean ± std over folds")
    tracker.artifact(run_id, path)
    tracker.finish(run_id)
    get_run_logger().info("\n" + summary["markdown"])
