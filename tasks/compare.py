"""The suite's summary run: the comparison tables (`agegender.report`) printed once, logged to
MLflow with every p-value (raw and Holm-adjusted) and CI, and drawn as a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender import plots
from agegender.config import Config, Resize, SuiteConfig
from agegender.metrics import sample_std
from agegender.report import LEVI_HASSNER, METRICS, summarize
from tracking.schema import summary_note, summary_tags
from tracking.store import Tracker


@task(cache_policy=NO_CACHE)
def compare_task(
    aggregates: dict[str, dict[str, Any]],
    suite: SuiteConfig,
    configs: dict[str, Config],
    image_size: int,
    synthetic: bool,
    run_root: str,
    resize: Resize = "antialias",
) -> dict[str, Any]:
    """Summary tables (logged as the suite's `summary` run; the CLI prints them) and a chart.
    `image_size`, `synthetic`, `resize`: what the folds were trained on (the cache's)."""
    title = f"suite `{suite.name}`"
    # the source is known only when the suite pretrains; a given backbone names none
    sources = {"celeba": "CelebA", "utkface": "UTKFace"}
    pretrained_from = sources[suite.pretrain.source] if suite.pretrained is None else None
    summary = summarize(
        aggregates,
        configs,
        image_size,
        synthetic,
        title=title,
        published_spread=suite.published_spread,
        pretrained_from=pretrained_from,
        resize=resize,
    )
    tracker = Tracker(suite.name, Path(run_root))
    run_id = _log_summary(tracker, suite, aggregates, summary, run_root)
    get_run_logger().info(f"summary tables logged to MLflow run {run_id} (summary.md)")
    return summary


def _log_summary(
    tracker: Tracker,
    suite: SuiteConfig,
    aggregates: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    run_root: str,
) -> str:
    tags = summary_tags(suite.name, summary["synthetic"])
    run_id, _ = tracker.find_or_start("summary", tags, summary_note(suite.name))
    tracker.text(run_id, summary["markdown"], "summary.md")
    metrics: dict[str, float] = {}
    for t in summary["tests"] + summary["tests_other_reading"]:
        for name, key in (
            ("p", "p"),
            ("p_holm", "p_holm"),
            ("diff", "diff"),
            ("ci_low", "low"),
            ("ci_high", "high"),
            ("ci_sim_low", "sim_low"),
            ("ci_sim_high", "sim_high"),
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
