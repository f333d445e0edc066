"""What a run carries in MLflow: the tags of each kind of run, and the records callers get back.

Every tag name is written here and nowhere else, so a table, a skip-if-finished lookup and the
UI's filters all agree on them. No MLflow import: `tracking.store` turns MLflow's objects into
these records.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agegender.config import Config, deviations


@dataclass(frozen=True)
class RunRecord:
    """A run as the project reads it back."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    start_time: int  # ms since the epoch
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def fold(self) -> int:
        return int(self.tags["fold"])

    @property
    def seed(self) -> int:
        """The seed the fold trained with (runs logged before the tag: the train.seed param)."""
        return int(self.tags.get("seed", self.params.get("train.seed", "0")))

    def test_metrics(self) -> dict[str, float]:
        """The test numbers, without their `test_` prefix."""
        return {k[5:]: v for k, v in self.metrics.items() if k.startswith("test_")}


@dataclass(frozen=True)
class VersionRecord:
    """A version of a registered model."""

    name: str
    version: str
    run_id: str
    source: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataInput:
    """One part of the data a run trained or was tested on, as MLflow's dataset view shows it:
    `digest` is the cache fingerprint (short), `context` says which part."""

    name: str
    digest: str
    source: str
    context: str  # train, validation, test (DATASET_CONTEXT)
    profile: Mapping[str, object] = field(default_factory=dict)


# MLflow's own input tag, read by its UI's dataset view (mlflow.utils.mlflow_tags)
DATASET_CONTEXT = "mlflow.data.context"
CONTEXTS = {"train": "train", "val": "validation", "test": "test"}


def data_inputs(
    dataset: str, trained_on: str, fingerprint: str, source: str, sizes: Mapping[str, int]
) -> list[DataInput]:
    """The parts a run used (`sizes`: part -> images), one dataset each: MLflow keeps one input
    per dataset and run, so each part is its own dataset ("adience fold 0 (test)")."""
    name = trained_on if trained_on.startswith(dataset) else f"{dataset} {trained_on}"
    return [
        DataInput(
            name=f"{name} ({CONTEXTS.get(part, part)})",
            digest=fingerprint[:8],
            source=source,
            context=CONTEXTS.get(part, part),
            profile={"num_rows": n, "part": part, "data_fingerprint": fingerprint},
        )
        for part, n in sizes.items()
    ]


def config_tags(config: Config, synthetic: bool) -> dict[str, str]:
    """What a table needs to say about a run: the preset it started from and how it differs,
    the split protocol, and whether the data were synthetic."""
    return {
        "preset": config.preset,
        "preset_deviations": ", ".join(deviations(config))[:4000] or "none",
        "protocol": config.data.split.protocol,
        "synthetic": str(synthetic).lower(),
    }


def fold_tags(
    suite: str,
    variant: str,
    fold: int,
    config: Config,
    fingerprint: str,
    synthetic: bool,
    parent_id: str,
) -> dict[str, str]:
    """A fold's identity: a FINISHED run with these tags is that fold, trained."""
    return (
        {
            "suite": suite,
            "variant": variant,
            "fold": str(fold),
            "seed": str(config.train.seed),
            "task": config.train.task,
            "config_hash": config.hash(),
            "data_fingerprint": fingerprint,
            "kind": "fold",
        }
        | config_tags(config, synthetic)
        | {"parent": parent_id}
    )


def parent_tags(
    suite: str,
    variant: str,
    config: Config,
    fingerprint: str,
    synthetic: bool,
    seeds: Sequence[int],
) -> dict[str, str]:
    """A variant's parent run (its folds are children; it holds their mean and std)."""
    return {
        "suite": suite,
        "variant": variant,
        "kind": "parent",
        "config_hash": config.hash(),
        "data_fingerprint": fingerprint,
        "task": config.train.task,
        "seeds": ",".join(map(str, seeds)),
    } | config_tags(config, synthetic)


def pretrain_tags(
    source: str, trained_on: str, config: Config, fingerprint: str, synthetic: bool
) -> dict[str, str]:
    return {
        "kind": "pretrain",
        "source": source,
        "trained_on": trained_on,
        "config_hash": config.hash(),
        "data_fingerprint": fingerprint,
    } | config_tags(config, synthetic)


def summary_tags(suite: str, synthetic: bool) -> dict[str, str]:
    return {"suite": suite, "kind": "summary", "synthetic": str(synthetic).lower()}


def backbone_tags(pretrained_from: str, run_id: str | None) -> dict[str, str]:
    """Where multitask_pretrained's checkpoint is from, for its parent run."""
    tags = {"pretrained_from": pretrained_from}
    if run_id:
        tags["pretrain_run_id"] = run_id
    return tags


def device_tags(requested: str, fallback: str | None) -> dict[str, str]:
    """How a run's device was chosen (`fallback`: why `auto` ended on the CPU)."""
    tags = {"device_requested": requested}
    if fallback:
        tags["device_fallback"] = fallback
    return tags


def trained_tags(device: str) -> dict[str, str]:
    """Where a finished training ran: the device and the code's commit."""
    return {"git_commit": git_commit(), "device": device}


def registered_tag(uri: str) -> dict[str, str]:
    return {"registered_model": uri}


def champion_tags(
    variant: str, suite: str, fold_run: RunRecord, score: float, selected_by: str
) -> dict[str, str]:
    """A champion model version: which fold run it is and why it was chosen."""
    tags = {
        "variant": variant,
        "suite": suite,
        "fold": str(fold_run.fold),
        "fold_run_id": fold_run.run_id,
        "selection_score": f"{score:.6f}",
        "selected_by": selected_by,
    }
    return tags | {f"test_{k}": f"{v:.4f}" for k, v in fold_run.test_metrics().items()}


def of_fold_run(version: VersionRecord, run_id: str) -> bool:
    """Whether a model version was registered from this fold run."""
    return version.tags.get("fold_run_id") == run_id


@functools.cache
def git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() or "unknown"
