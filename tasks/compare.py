"""Comparing the variants: the seed's three tables, done right, as the suite's summary run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy import stats

from agegender import plots
from agegender.config import SuiteConfig
from agegender.metrics import sample_std
from tasks.tracking import Tracker

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


def _ttest(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value (NaN when undefined: < 2 folds or no variance)."""
    if len(a) < 2 or np.allclose(np.subtract(a, b), np.mean(np.subtract(a, b))):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def _fmt(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * sample_std(values):.1f}"


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


@task(cache_policy=NO_CACHE)
def compare_task(
    aggregates: dict[str, dict[str, Any]], suite: dict[str, Any], protocol: str, run_root: str
) -> dict[str, Any]:
    """Summary tables (printed and logged as the suite's `summary` run) and a comparison chart."""
    s = SuiteConfig.model_validate(suite)
    summary = summarize(aggregates, protocol)
    _log_summary(Tracker(s.name, Path(run_root)), s, aggregates, summary, run_root)
    return summary


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
            m: (float(np.mean(a["values"][m])), sample_std(a["values"][m]))
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
