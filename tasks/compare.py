"""The suite's summary run: the comparison tables (`agegender.report`) printed once, logged to
MLflow with every p-value (raw and Holm-adjusted) and CI, and drawn as a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender import plots
from agegender.config import Config, SuiteConfig
from agegender.metrics import sample_std
from agegender.report import LEVI_HASSNER, METRICS, summarize
from tasks.tracking import Tracker


@task(cache_policy=NO_CACHE)
def compare_task(
    aggregates: dict[str, dict[str, Any]],
    suite: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    data: dict[str, Any],
    run_root: str,
) -> dict[str, Any]:
    """Summary tables (logged as the suite's `summary` run; the CLI prints them) and a chart.
    `data`: what the folds were trained on (`synthetic`, the cache's `image_size`)."""
    s = SuiteConfig.model_validate(suite)
    summary = summarize(
        aggregates,
        {v: Config.model_validate(c) for v, c in configs.items()},
        int(data["image_size"]),
        bool(data["synthetic"]),
        title=f"suite `{s.name}`",
    )
    run_id = _log_summary(Tracker(s.name, Path(run_root)), s, aggregates, summary, run_root)
    get_run_logger().info(f"summary tables logged to MLflow run {run_id} (summary.md)")
    return summary


def _log_summary(
    tracker: Tracker,
    suite: SuiteConfig,
    aggregates: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    run_root: str,
) -> str:
    tags = {"suite": suite.name, "kind": "summary", "synthetic": str(summary["synthetic"]).lower()}
    found = tracker.find(tags, finished_only=False)
    run_id = str(found.info.run_id) if found else tracker.start("summary", tags)
    tracker.text(run_id, summary["markdown"], "summary.md")
    metrics: dict[str, float] = {}
    for t in summary["tests"]:
        for name, key in (
            ("p", "p"),
            ("p_holm", "p_holm"),
            ("diff", "diff"),
            ("ci_low", "low"),
            ("ci_high", "high"),
        ):
            if np.isfinite(t[key]):
                metrics[f"{name}_{t['key']}"] = float(t[key])
    tracker.log(run_id, metrics=metrics)
    groups = {
        v: {
            m: (float(np.mean(a["values"][m])), sample_std(a["values"][m]))
            for m in METRICS
            if m in a["values"] and len(a["values"][m]) > 1
        }
        for v, a in aggregates.items()
    }
    if not summary["synthetic"]:  # published real-data numbers never next to synthetic ones
        groups |= {p.name: dict(p.values) for p in LEVI_HASSNER if p.crop == ""}
    path = Path(run_root) / suite.name / "compare.png"
    title = f"{suite.name}: mean ± std over folds (centre crop)"
    plots.compare_bars(groups, path, title + (" — SYNTHETIC data" if summary["synthetic"] else ""))
    tracker.artifact(run_id, path)
    tracker.finish(run_id)
    return run_id
