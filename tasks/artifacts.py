"""The suite's results where a Prefect user looks: artifacts on the suite's flow run.

`publish` is called from the flow's body, not as a task: an artifact made inside a task run
belongs to that task run, and the UI lists it under "Task runs" instead of the flow run's own.

The comparison tables (markdown), each variant's folds (a table: one row per fold, then mean
and sample std) and links to each variant's MLflow parent run and its registered champion.
A local (SQLite) store has no web address: its links point where the printed `mlflow ui`
command serves it (`LOCAL_UI`), and their descriptions say to run that command first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from agegender.metrics import sample_std
from tracking.store import Tracker

LOCAL_UI = "http://127.0.0.1:5000"  # where Tracker.ui_command()'s `mlflow ui` listens
DIGITS = 4  # table values: enough to tell folds apart, short enough to read


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only (`multitask_pretrained`
    becomes `multitask-pretrained`)."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)
    return re.sub(r"-+", "-", key).strip("-")


def ui_base(tracker: Tracker) -> str:
    return LOCAL_UI if tracker.local else tracker.uri.rstrip("/")


def run_url(tracker: Tracker, run_id: str) -> str:
    """A run's page in the MLflow UI."""
    return f"{ui_base(tracker)}/#/experiments/{tracker.experiment_id}/runs/{run_id}"


def version_url(tracker: Tracker, name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI."""
    return f"{ui_base(tracker)}/#/models/{quote(name)}/versions/{version}"


def fold_table(aggregate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per fold with its test metrics (averaged over seeds, as the statistics see
    them), then the mean and the sample std (ddof=1) over the folds."""
    values: Mapping[str, list[float]] = aggregate["values"]
    sizes: Mapping[str, list[float]] = aggregate.get("sizes", {})
    names = sorted(values)
    rows: list[dict[str, Any]] = []
    for i, fold in enumerate(aggregate["folds"]):
        row: dict[str, Any] = {"fold": str(fold)}
        row |= {f"test_{m}": round(values[m][i], DIGITS) for m in names}
        row |= {k: int(sizes[k][i]) for k in ("n_test", "seeds") if k in sizes}
        rows.append(row)
    for label, stat in (("mean", lambda v: float(np.mean(v))), ("std", sample_std)):
        row = {"fold": label} | {f"test_{m}": _round(stat(values[m])) for m in names}
        rows.append(row | {k: "" for k in ("n_test", "seeds") if k in sizes})
    return rows


def _round(value: float) -> float | str:
    """NaN (the std of one fold) is not JSON: the table shows a dash."""
    return round(value, DIGITS) if np.isfinite(value) else "-"


def publish(
    suite: str,
    run_root: str,
    summary_markdown: str,
    aggregates: Mapping[str, Mapping[str, Any]],
    parents: Mapping[str, str],
    champions: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """The suite's artifacts, on the calling flow run; the keys made, in order."""
    tracker = Tracker(suite, Path(run_root))
    local = ""
    if tracker.local:
        local = f" (local store: run `{tracker.ui_command()}` first)"
    keys = [artifact_key("suite", suite, "summary")]
    create_markdown_artifact(
        summary_markdown,
        key=keys[-1],
        description=f"Suite `{suite}`: the comparison tables, as in MLflow's `summary` run{local}",
    )
    for variant, aggregate in aggregates.items():
        keys.append(artifact_key(suite, variant, "folds"))
        create_table_artifact(
            fold_table(aggregate),
            key=keys[-1],
            description=f"`{variant}`: test metrics per fold, mean and sample std",
        )
    for variant, parent in parents.items():
        keys.append(artifact_key(suite, variant, "mlflow-run"))
        create_link_artifact(
            run_url(tracker, parent),
            link_text=f"{variant}: MLflow parent run {parent}",
            key=keys[-1],
            description=f"`{variant}`: its folds, aggregates and model in MLflow{local}",
        )
    for variant, champion in champions.items():
        name, version = str(champion["name"]), str(champion["version"])
        keys.append(artifact_key(suite, variant, "champion"))
        create_link_artifact(
            version_url(tracker, name, version),
            link_text=f"{name} version {version} (fold {champion['fold']}), {champion['uri']}",
            key=keys[-1],
            description=f"`{variant}`: the registered champion{local}",
        )
    return keys
