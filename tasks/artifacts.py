"""The suite's results where a Prefect user looks: artifacts on the suite's flow run.

`publish` is called from the flow's body, not as a task: an artifact made inside a task run
belongs to that task run, and the UI lists it under "Task runs" instead of the flow run's own.

The comparison tables (markdown, narrow: Prefect's page cuts wide tables off), the variants
and protocol beside them, each variant's folds (a table: one row per fold, then mean and sample
std) and links to each variant's MLflow parent run and its registered champion (`Tracker`'s
URLs, in MLflow's model-training layout). A local store (SQLite) has no web address: its links
point where the printed `mlflow ui` command serves it (`Tracker.ui_base`,
AGEGENDER_MLFLOW_UI_PORT), and their descriptions say to run that command first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from agegender.metrics import sample_std
from tracking.store import Tracker

DIGITS = 4  # table values: enough to tell folds apart, short enough to read


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only (`multitask_pretrained`
    becomes `multitask-pretrained`)."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)
    return re.sub(r"-+", "-", key).strip("-")


def fold_table(aggregate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per fold with its test metrics (averaged over seeds, as the statistics see
    them), then the mean and the sample std (ddof=1) over the folds. Short column names (the
    description says they are test metrics; `seeds` only where a fold ran more than once), so
    that Prefect's page shows the whole table."""
    values: Mapping[str, list[float]] = aggregate["values"]
    sizes = dict(aggregate.get("sizes", {}))
    if all(s == 1 for s in sizes.get("seeds", [])):
        sizes.pop("seeds", None)
    names = sorted(values)
    rows: list[dict[str, Any]] = []
    for i, fold in enumerate(aggregate["folds"]):
        row: dict[str, Any] = {"fold": str(fold)}
        row |= {m: round(values[m][i], DIGITS) for m in names}
        row |= {k: int(sizes[k][i]) for k in ("n_test", "seeds") if k in sizes}
        rows.append(row)
    for label, stat in (("mean", lambda v: float(np.mean(v))), ("std", sample_std)):
        row = {"fold": label} | {m: _round(stat(values[m])) for m in names}
        rows.append(row | {k: "" for k in ("n_test", "seeds") if k in sizes})
    return rows


def _round(value: float) -> float | str:
    """NaN (the std of one fold) is not JSON: the table shows a dash."""
    return round(value, DIGITS) if np.isfinite(value) else "-"


def publish(
    tracker: Tracker,
    summary: Mapping[str, Any],
    aggregates: Mapping[str, Mapping[str, Any]],
    parents: Mapping[str, str],
    champions: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """The suite's artifacts (the suite is `tracker`'s experiment), on the calling flow run;
    the keys made, in order."""
    suite = tracker.experiment
    local = ""
    if tracker.local_store:
        local = f" (local store: run `{tracker.serve_command()}` first, then open the link)"
    keys = [artifact_key("suite", suite, "summary")]
    create_markdown_artifact(
        str(summary["narrow_markdown"]),
        key=keys[-1],
        description=f"Suite `{suite}`: the comparison tables, as in MLflow's `summary` run{local}",
    )
    keys.append(artifact_key("suite", suite, "protocol"))
    create_markdown_artifact(
        str(summary["protocol_markdown"]),
        key=keys[-1],
        description=f"Suite `{suite}`: the variants, and the protocol next to Levi & Hassner's",
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
            tracker.run_url(parent),
            link_text=f"{variant}: MLflow parent run {parent}",
            key=keys[-1],
            description=f"`{variant}`: its folds, aggregates and model in MLflow{local}",
        )
    for variant, champion in champions.items():
        name, version = str(champion["name"]), str(champion["version"])
        keys.append(artifact_key(suite, variant, "champion"))
        create_link_artifact(
            tracker.version_url(name, version),
            link_text=f"{name} version {version} (fold {champion['fold']}), {champion['uri']}",
            key=keys[-1],
            description=f"`{variant}`: the registered champion{local}",
        )
    return keys
