"""The orchestrated suite end to end: Prefect (ephemeral API), MLflow (SQLite store), real folds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from agegender.cache import build_cache
from agegender.config import CacheConfig, load_config
from agegender.labels import AGE_GROUPS
from agegender.synth.adience import SynthResult
from agegender.train import train_fold
from tests.conftest import REPO, suite_argv

TINY = [
    "data.crop=48",
    "train.iterations=6",
    "model.norm=batchnorm",
    "optim.name=adam",
    "optim.weight_decay=0",
    "train.patience=null",
]
VARIANTS = {"multitask", "multitask_pretrained", "age", "gender"}


@pytest.fixture(scope="module")
def pretrained(small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in "larger face set" checkpoint: another synthetic set, trained briefly."""
    root = tmp_path_factory.mktemp("pretrain")
    build_cache(small_synth.out, root / "cache", config=CacheConfig(image_size=56))
    config = load_config(None, [*TINY, "train.iterations=3", "train.tencrop=false"])
    return train_fold(root / "cache", 0, config, root / "run").out_dir / "best.pt"


def _cmd(cache: Path, run_root: Path, pretrained: Path, *extra: str) -> list[str]:
    # two folds at once (suite.slots=2); every run here the same (threads change float sums);
    # three folds of each variant: the statistics across folds need two, the kill a spread
    return suite_argv(
        cache,
        run_root,
        f"suite.pretrained={pretrained}",
        "suite.slots=2",
        "suite.folds=[0, 1, 2]",
        *TINY,
        *extra,
    )


FOLDS = 4 * 3  # variants x folds


def _client(run_root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("agegender")
    assert experiment is not None
    return client, experiment.experiment_id


def _runs(run_root: Path, kind: str) -> list:  # type: ignore[type-arg]
    client, exp = _client(run_root)
    query = f"tags.kind = '{kind}' and attributes.status = 'FINISHED'"
    return list(client.search_runs([exp], query, max_results=1000))


def _fold_metrics(run_root: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Every logged number of every fold but the throughput and the system metrics (the
    machine's, not the model's)."""
    return {
        (r.data.tags["variant"], r.data.tags["fold"]): {
            k: v
            for k, v in r.data.metrics.items()
            if k != "images_per_s" and not k.startswith("system/")
        }
        for r in _runs(run_root, "fold")
    }


def _summary(output: str) -> str:
    match = re.search(r"(# suite .*?)\n\d+ fold\(s\) trained", output, re.S)
    assert match, output[-3000:]
    assert output.count("## Table 1.") == 1, "the summary is printed once"
    return match.group(1)


@pytest.mark.integration
def test_suite_survives_a_kill_and_tracks_everything(
    learn_cache: Path, pretrained: Path, tmp_path: Path
) -> None:
    run_root = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(learn_cache, run_root, pretrained),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(run_root.glob("*/*/fold*/result.json"))) < 5:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Prefect server it started
    proc.wait()
    logged = len(_runs(run_root, "fold"))
    assert 2 <= logged < FOLDS, f"{logged} folds were logged before the kill"

    rerun = subprocess.run(
        _cmd(learn_cache, run_root, pretrained),
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    assert output.count("not trained again") == logged
    trained = int(re.search(r"(\d+) fold\(s\) trained", rerun.stdout).group(1))  # type: ignore[union-attr]
    assert trained <= FOLDS - logged  # a fold that finished but was not logged is not retrained

    straight_root = tmp_path / "straight"
    straight = subprocess.run(
        _cmd(learn_cache, straight_root, pretrained),
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=900,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert f"{FOLDS} fold(s) trained" in straight.stdout
    # Same seeds -> same folds and the same final tables, whatever the kill and the scheduling.
    assert _fold_metrics(run_root) == _fold_metrics(straight_root)
    assert _summary(rerun.stdout) == _summary(straight.stdout)

    client, _ = _client(run_root)
    parents = {r.data.tags["variant"]: r for r in _runs(run_root, "parent")}
    folds = _runs(run_root, "fold")
    assert set(parents) == VARIANTS
    assert len(folds) == FOLDS
    assert parents["multitask_pretrained"].data.tags["pretrained_from"] == str(pretrained)
    for variant, parent in parents.items():
        children = [r for r in folds if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(r.data.tags["fold"] for r in children) == ["0", "1", "2"]
        means = {k for k in parent.data.metrics if k.endswith("_mean")}
        assert {"test_age_acc_mean", "test_gender_acc_mean"} & means
        for key in means:
            values = [r.data.metrics[key[: -len("_mean")]] for r in children]
            assert parent.data.metrics[key] == pytest.approx(np.mean(values), abs=1e-12)
            std = parent.data.metrics[key[: -len("_mean")] + "_std"]
            assert std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
            "fold_bars.png",
            "results.md",
        }
        child = children[0]
        assert child.data.params["optim.name"] == "adam"
        assert child.data.params["train.task"] == (
            "multitask" if "multitask" in variant else variant
        )
        for tag in ("fold", "task", "protocol", "git_commit", "data_fingerprint", "config_hash"):
            assert child.data.tags[tag], tag
        assert child.data.tags["step"] == "eager (op by op)"  # how its steps ran
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {
            "best.pt",
            "learning_curves.png",
            "test_predictions.csv",
            "result.json",
        } <= artifacts
        heads = {"age", "gender"} if "multitask" in variant else {variant}
        assert {f"confusion_{h}.png" for h in heads} <= artifacts
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert len(history) >= 1
    summary = _runs(run_root, "summary")
    assert len(summary) == 1
    text = client.download_artifacts(summary[0].info.run_id, "summary.md", str(tmp_path))
    body = Path(text).read_text()
    assert body.strip() == _summary(rerun.stdout).strip()
    for title in (
        "# suite `agegender`: summary — SYNTHETIC DATA",
        "## Table 1. Ours, 10-crop\n",
        "## Table 2. Ours, centre crop\n",
        "| split | subject-disjoint (test = metadata fold k) | their published lists",
        "| data | SYNTHETIC images (agegender synth) | Adience (real photos) | differs |",
        "corrected resampled t-test (Nadeau & Bengio 2003)",
        "| multitask_pretrained − multitask | age exact (10-crop) |",
        "| multitask − gender | gender (10-crop) |",
        "| resize | 56 px images, 48 px crops; JPEG draft decoding, antialiased bilinear |",
    ):
        assert title in body, title
    holm = re.search(r"Holm-adjusted over the (\d) p-values", body)
    assert holm, body
    # synthetic folds are never set against published real-data numbers
    for published in ("50.7", "86.8", "49.5", "Welch", "Eidinger"):
        assert published not in body, published
    (summary_run,) = summary
    assert summary_run.data.tags["synthetic"] == "true"
    p_keys = {k for k in summary_run.data.metrics if k.startswith("p_")}
    assert len(p_keys) == 2 * int(holm.group(1))  # raw and Holm-adjusted, of 6 comparisons
    assert int(holm.group(1)) <= 6
    assert body.count("\n| multitask") == 6  # the comparisons: 3 pretrained, 3 single-task
    assert all("levi_hassner" not in k for k in p_keys)
    for child in folds:
        assert child.data.tags["synthetic"] == "true"
        assert child.data.tags["preset"] == "paper"
        assert "data.crop=48" in child.data.tags["preset_deviations"]


def _agegender(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("agegender")
    cmd = [str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=900)


@pytest.mark.integration
def test_suite_pretrains_once_and_links_the_pretraining_run(
    learn_cache: Path, synth_celeba: Path, photos: dict[str, Any], tmp_path: Path
) -> None:
    run_root = tmp_path / "runs"
    suite: list[str | Path] = [
        "suite",
        "--cache",
        learn_cache,
        "--run-root",
        run_root,
        "suite.variants=[multitask_pretrained]",
        "suite.folds=[0, 1]",
        "suite.image_size=56",
    ]
    auto = [f"suite.pretrain.root={synth_celeba}", "suite.pretrain.overrides=[train.iterations=4]"]
    first = _agegender(*suite, *auto, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 fold(s) trained" in first.stdout

    client, _ = _client(run_root)
    (pre,) = _runs(run_root, "pretrain")
    pre_id = pre.info.run_id
    assert (pre.data.tags["source"], pre.data.params["train.iterations"]) == ("celeba", "4")
    # CelebA's binary age head: accuracies logged, no 1-off (it would always be 1)
    assert {"test_age_acc", "test_gender_acc"} <= pre.data.metrics.keys()
    assert "test_age_1off" not in pre.data.metrics
    files = {a.path for a in client.list_artifacts(pre_id)}
    assert {"checkpoint", "learning_curves.png", "confusion_age.png", "result.json"} <= files
    (version,) = client.search_model_versions("name = 'agegender-pretrained-celeba'")
    assert (version.run_id, version.source) == (pre_id, f"runs:/{pre_id}/checkpoint")
    uri = f"models:/agegender-pretrained-celeba/{version.version}"
    assert pre.data.tags["registered_model"] == uri

    (parent,) = _runs(run_root, "parent")
    assert parent.data.tags["pretrain_run_id"] == pre_id
    assert parent.data.tags["pretrained_from"] == uri
    # the folds started from exactly the weights that were logged and registered
    logged = client.download_artifacts(pre_id, "checkpoint/best.pt", str(tmp_path))
    for fold in _runs(run_root, "fold"):
        assert Path(fold.data.params["model.init_from"]).read_bytes() == Path(logged).read_bytes()

    # The variant's best fold by validation (never by test) is its registered champion, a
    # pyfunc model that carries its preprocessing.
    name = "agegender-multitask_pretrained"
    champion = client.get_model_version_by_alias(name, "champion")
    folds = _runs(run_root, "fold")
    best = max(folds, key=lambda r: r.data.metrics["selection_score"])
    assert best.data.metrics["selection_score"] == -best.data.metrics["selected_val_loss"]
    assert (champion.run_id, champion.tags["fold_run_id"]) == (best.info.run_id, best.info.run_id)
    assert champion.tags["parent_run_id"] == parent.info.run_id
    assert champion.tags["fold"] == best.data.tags["fold"]
    assert champion.tags["selected_by"] == "val loss of the final checkpoint"
    model_name = f"multitask_pretrained-fold{best.data.tags['fold']}"
    # (an MLflow 3 logged model of the fold run: its files are the version's source)
    models = client.search_logged_models([parent.info.experiment_id], f"name = '{model_name}'")
    assert [m.source_run_id for m in models] == [best.info.run_id]
    assert champion.source == models[0].artifact_location
    mlmodel = mlflow.artifacts.download_artifacts(
        f"{champion.source}/MLmodel", dst_path=str(tmp_path), tracking_uri=client.tracking_uri
    )
    meta = yaml.safe_load(Path(mlmodel).read_text())["metadata"]
    assert meta["preprocessing"]["image_size"] == 56
    assert meta["preprocessing"]["crop"] == 48
    assert meta["preprocessing"]["labels"] == {"age": list(AGE_GROUPS), "gender": ["m", "f"]}
    assert len(meta["preprocessing"]["normalize"]["mean"]) == 3
    assert f"models:/{name}@champion" in first.stdout
    # `agegender predict` fetches it from the registry: the same rows as the fold's own best.pt
    two = photos["dir"] / "two.jpg"
    by_uri = _agegender(
        "predict", two, "--model", f"models:/{name}@champion", "--run-root", run_root
    )
    assert by_uri.returncode == 0, by_uri.stderr[-3000:]
    fold_best = client.download_artifacts(best.info.run_id, "best.pt", str(tmp_path / "fold"))
    by_path = _agegender("predict", two, "--model", fold_best)
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    rows = [json.loads(line) for line in by_uri.stdout.splitlines()]
    assert [r["face"] for r in rows] == [0, 1]
    assert rows == [json.loads(line) for line in by_path.stdout.splitlines()]

    # Pretraining is cached like a fold: a rerun trains nothing and registers nothing new.
    again = _agegender(*suite, *auto, *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "pretraining on celeba: already finished" in output
    assert "0 fold(s) trained" in again.stdout
    assert len(_runs(run_root, "pretrain")) == 1
    assert len(client.search_model_versions("name = 'agegender-pretrained-celeba'")) == 1
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # The registered model as the given backbone: the same weights, so the same folds.
    given = _agegender(*suite, f"suite.pretrained={uri}", *TINY)
    assert given.returncode == 0, given.stderr[-3000:]
    assert "0 fold(s) trained" in given.stdout
    # and `agegender pretrain` (same settings) finds the same run instead of training again
    standalone = _agegender(
        "pretrain",
        "--source",
        "celeba",
        "--data-root",
        synth_celeba,
        "--run-root",
        run_root,
        "--image-size",
        "56",
        "--json",
        *TINY,
        "train.iterations=4",
    )
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    result = json.loads(standalone.stdout[standalone.stdout.index("{") :])
    assert (result["run_id"], result["model_uri"], result["trained"]) == (pre_id, uri, False)


@pytest.mark.integration
def test_seeds_repeat_each_fold_and_are_averaged_per_fold(
    learn_cache: Path, tmp_path: Path
) -> None:
    run_root = tmp_path / "runs"
    res = _agegender(
        "suite",
        "--cache",
        learn_cache,
        "--run-root",
        run_root,
        "suite.variants=[gender]",
        "suite.folds=[0, 1]",
        "suite.seeds=[0, 1]",
        "suite.register_champions=false",
        *TINY,
        "train.tencrop=false",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 fold(s) trained" in res.stdout
    folds = _runs(run_root, "fold")
    by = {(r.data.tags["fold"], r.data.tags["seed"]): r.data.metrics for r in folds}
    assert set(by) == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    per_fold = [np.mean([by[(k, s)]["test_gender_acc"] for s in "01"]) for k in "01"]
    assert by[("0", "0")] != by[("0", "1")]  # the seeds are different runs
    (parent,) = _runs(run_root, "parent")
    assert parent.data.tags["seeds"] == "0,1"
    assert parent.data.metrics["test_gender_acc_mean"] == pytest.approx(np.mean(per_fold))
    assert parent.data.metrics["test_gender_acc_std"] == pytest.approx(np.std(per_fold, ddof=1))
    assert "| repeats | 2 runs per fold, averaged per fold |" in res.stdout
