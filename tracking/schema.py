"""What a run carries in MLflow: the tags of each kind of run, and the records callers get back.

Every tag name is written here and nowhere else, so a table, a skip-if-finished lookup and the
UI's filters all agree on them. No MLflow import: `tracking.store` turns MLflow's objects into
these records.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agegender.config import Config, deviations

# MLflow's own tag names (`mlflow.utils.mlflow_tags`; written out: this module imports no MLflow)
NOTE = "mlflow.note.content"  # the run's description in the UI
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
EXPERIMENT_KIND = "mlflow.experimentKind"
# system samples a full writer queue dropped during a long outage (`tracking.writer`)
SYSTEM_METRICS_GAP = "system_metrics_gap"
# The UI's ExperimentKind for model training ("Machine learning"), from MLflow 3.17's JS bundle
# (mlflow/server/js/build/static/js/main.*.js); without it the UI may treat it as GenAI.
MODEL_TRAINING = "custom_model_development"
# The runs table as our links open it: MLflow 3.17's shared views are experiment tags
# `mlflow.sharedViewState.<key>` that `#/experiments/ID/runs?viewStateShareKey=<key>` applies
# (the table otherwise shows Dataset, Source and Models, every metric under "Columns").
SHARED_VIEW = "mlflow.sharedViewState."
VIEW_KEY = "agegender-results"
RUNS_VIEW = {
    "selectedColumns": [
        "tags.`variant`",
        "tags.`fold`",
        *(
            f"metrics.`test_{m}{agg}`"
            for agg in ("", "_mean", "_std")
            for m in ("age_acc", "age_1off", "gender_acc")
        ),
    ]
}


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
    dataset: str,
    trained_on: str,
    fingerprint: str,
    source: str,
    sizes: Mapping[str, int],
    task: str,
) -> list[DataInput]:
    """The parts a run used (`sizes`: part -> images), one dataset each: MLflow keeps one input
    per dataset and run, so each part is its own dataset ("adience fold 0 (test, age)"). The
    task is in the name: a part holds the images labelled for it, and MLflow keeps one profile
    per name and digest in an experiment, so age and gender runs must not share one."""
    name = trained_on if trained_on.startswith(dataset) else f"{dataset} {trained_on}"
    return [
        DataInput(
            name=f"{name} ({CONTEXTS.get(part, part)}, {task})",
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


def trained_tags(summary: dict[str, Any]) -> dict[str, str]:
    """Where and how a finished training ran: the device, how its steps ran (`train.step`: one
    CUDA graph a step, compiled, ..., and anything that did not go as planned). The code's
    commit was tagged when the run opened."""
    tags = {"device": str(summary["device"])}
    if "step" in summary:  # results written before the graph step have none
        tags["step"] = str(summary["step"])[:4000]
    return tags


def registered_tag(uri: str) -> dict[str, str]:
    return {"registered_model": uri}


def champion_tags(
    variant: str, suite: str, fold_run: RunRecord, value: float, selected_by: str, parent_id: str
) -> dict[str, str]:
    """A champion model version: which fold run it is (the version's own run), its variant's
    parent run, and why it was chosen (`value`: the validation metric as measured)."""
    tags = {
        "variant": variant,
        "suite": suite,
        "fold": str(fold_run.fold),
        "fold_run_id": fold_run.run_id,
        "parent_run_id": parent_id,
        "selected_value": f"{value:.6f}",
        "selected_by": selected_by,
    }
    return tags | {f"test_{k}": f"{v:.4f}" for k, v in fold_run.test_metrics().items()}


def model_name(variant: str, fold: int) -> str:
    """A champion's logged model: its variant and fold (`multitask-fold0`), so the experiment's
    Models list tells the variants' models apart."""
    return f"{variant}-fold{fold}"


def of_fold_run(version: VersionRecord, run_id: str) -> bool:
    """Whether a model version was registered from this fold run."""
    return version.tags.get("fold_run_id") == run_id


@functools.cache
def git_commit(short: bool = True) -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() or "unknown"


def experiment_tags() -> dict[str, str]:
    """The suite's experiment is model training, not a GenAI app."""
    return {EXPERIMENT_KIND: MODEL_TRAINING, f"{SHARED_VIEW}{VIEW_KEY}": json.dumps(RUNS_VIEW)}


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: the UI's Source column and the code's git commit."""
    tags = {SOURCE_NAME: "agegender", SOURCE_TYPE: "JOB"}
    commit = git_commit(short=False)
    if commit != "unknown":
        tags[GIT_COMMIT] = commit
    return tags


def parent_note(suite: str, variant: str, config: Config, seeds: Sequence[int]) -> dict[str, str]:
    """A variant's parent run, described for the UI."""
    from agegender.report import variant_description  # (scipy: loaded only when needed)

    runs = "fold" if len(seeds) <= 1 else f"fold and seed ({', '.join(map(str, seeds))})"
    text = (
        f"**{variant}**: {variant_description(variant)}.\n\n"
        f"Suite `{suite}`, {config.data.split.protocol} cross-validation, preset "
        f"`{config.preset}`. Its child runs are one per {runs}; this run holds their test "
        "metrics' mean and sample std (`*_mean`, `*_std`) and `results.md`."
    )
    return {NOTE: text}


RESULTS = "Test metrics over the folds:"


def results_tags(note: str, folds: Sequence[str], table: str) -> dict[str, str]:
    """A parent run once its folds are aggregated: which folds (a tag, not a constant metric
    that the UI would chart) and its results table in its description, where the run page
    shows it first (a rerun replaces the table)."""
    base = note.split(RESULTS)[0].rstrip()
    return {"folds": ", ".join(folds), NOTE: f"{base}\n\n{RESULTS}\n\n{table}\n"}


def summary_note(suite: str) -> dict[str, str]:
    return {
        NOTE: f"Suite `{suite}`: the variants compared with each other and with Levi & Hassner "
        "(`summary.md`), from the parent runs' fold results."
    }


def pretrain_note(source: str, trained_on: str) -> dict[str, str]:
    return {
        NOTE: f"Pretraining on **{source}** ({trained_on}): the backbone that "
        "`multitask_pretrained` starts from; its `checkpoint/best.pt` is registered as a model."
    }


def champion_descriptions(
    variant: str, suite: str, fold_run: RunRecord, value: float, selected_by: str, folds: int
) -> tuple[str, str]:
    """(the registered model's description, the version's): what was chosen and why."""
    from agegender.report import variant_description

    model = (
        f"Variant **{variant}**: {variant_description(variant)}. Each version is the fold, of a "
        "suite's cross-validation, whose selected epoch scored best on its own validation part; "
        "the alias `champion` points at the latest."
    )
    tests = ", ".join(f"{k} {v:.4f}" for k, v in sorted(fold_run.test_metrics().items()))
    version = (
        f"Suite `{suite}`, variant `{variant}`, fold {fold_run.fold} (run {fold_run.run_id}): "
        f"chosen by {selected_by} = {value:.6f}, the best of {folds} folds. "
        f"Its test fold: {tests or 'no metrics'}."
    )
    return model, version


def pretrained_descriptions(
    source: str, trained_on: str, run_id: str, metrics: Mapping[str, float]
) -> tuple[str, str]:
    """(the registered model's description, the version's) for a pretrained backbone."""
    model = (
        f"A backbone pretrained on {source}, for `multitask_pretrained` "
        "(`suite.pretrained=models:/NAME/VERSION`); the files are `best.pt` checkpoints."
    )
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    version = f"Pretraining run {run_id} on {trained_on}" + (f": {numbers}." if numbers else ".")
    return model, version
