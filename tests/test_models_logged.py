"""What MLflow users look for, read back through `MlflowClient` from a real (SQLite) store: the
experiment's kind, MLflow's source tags, descriptions, and the champion as an MLflow 3 logged
model linked to its run, with a signature and an input example, behind a described version."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd  # type: ignore[import-untyped]
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from agegender.cache import build_cache
from agegender.config import CacheConfig, load_config
from agegender.report import variant_description
from agegender.synth.adience import SynthResult
from agegender.train import train_fold
from tests.conftest import REPO, STACK_SUITE
from tracking.schema import (
    NOTE,
    RunRecord,
    champion_descriptions,
    experiment_tags,
    parent_note,
    source_tags,
)
from tracking.store import Tracker

TINY = ["data.crop=48", "train.iterations=2", "train.tencrop=false"]
UI_BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


@pytest.fixture(scope="module")
def checkpoint(small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logged")
    build_cache(small_synth.out, root / "cache", config=CacheConfig(image_size=56, workers=1))
    return train_fold(root / "cache", 0, load_config(None, TINY), root / "run").out_dir / "best.pt"


def test_the_experiment_opens_as_model_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = experiment_tags()["mlflow.experimentKind"]
    # the value is the UI's own name for model training ("Machine learning"), not a guess
    bundle = "".join(p.read_text(errors="replace") for p in UI_BUNDLE.glob("main.*.js"))
    assert f'CUSTOM_MODEL_DEVELOPMENT="{kind}"' in bundle

    tracker = Tracker("kinds", tmp_path)
    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == kind
    # an experiment made before the tag existed gets it when a tracker opens it ...
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    Tracker("old", tmp_path)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == kind
    # ... but a kind someone chose in the UI is theirs
    chosen = client.create_experiment("chosen", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "genai_development")
    Tracker("chosen", tmp_path)
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    # the printed command lands on the runs table of this experiment
    url = tracker.ui_command().split(", then open ")[1]
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=agegender-results"
    )
    # ... in our view (MLflow's shared view state: the test metrics as columns), which a view
    # someone shared under that key in the UI does not lose
    view = json.loads(client.get_experiment(old).tags["mlflow.sharedViewState.agegender-results"])
    assert "metrics.`test_age_acc_mean`" in view["selectedColumns"]
    client.set_experiment_tag(chosen, "mlflow.sharedViewState.agegender-results", "{}")
    Tracker("chosen", tmp_path)
    assert client.get_experiment(chosen).tags["mlflow.sharedViewState.agegender-results"] == "{}"
    # a SQLite store named by MLFLOW_TRACKING_URI is served the same way (no `open sqlite:...`),
    # on the port the setting names
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    monkeypatch.setenv("AGEGENDER_MLFLOW_UI_PORT", "5123")
    named = Tracker("kinds", tmp_path)
    assert named.ui_command().startswith(f"mlflow ui --backend-store-uri '{tracker.uri}'")
    assert "--port 5123, then open http://127.0.0.1:5123/#/experiments/" in named.ui_command()
    monkeypatch.setenv("AGEGENDER_MLFLOW_UI_PORT", "50OO")
    with pytest.raises(ValueError, match=r"AGEGENDER_MLFLOW_UI_PORT='50OO': not a port number"):
        named.ui_command()


def test_runs_carry_mlflows_source_tags(tmp_path: Path) -> None:
    tracker = Tracker("sources", tmp_path)
    run = tracker.client.get_run(tracker.start("a run", {"kind": "fold"}))
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()
    assert run.data.tags[mlflow_tags.MLFLOW_SOURCE_NAME] == "agegender"
    assert run.data.tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "JOB"
    assert run.data.tags[mlflow_tags.MLFLOW_GIT_COMMIT] == head
    assert set(source_tags()) <= set(run.data.tags)
    assert NOTE == mlflow_tags.MLFLOW_RUN_NOTE


def test_parent_descriptions_say_what_the_variant_is() -> None:
    config = load_config(None, [])
    text = parent_note("adience-5fold", "multitask_pretrained", config, [0])[NOTE]
    assert variant_description("multitask_pretrained") in text
    assert "adience-5fold" in text
    assert "one per fold;" in text
    seeds = parent_note("s", "age", config, [1, 2])[NOTE]
    assert "one per fold and seed (1, 2)" in seeds


@pytest.mark.integration
def test_the_champion_is_a_logged_model_with_a_signature_and_descriptions(
    checkpoint: Path, small_synth: SynthResult, tmp_path: Path
) -> None:
    tracker = Tracker("models", tmp_path / "runs")
    client: MlflowClient = tracker.client
    parent = tracker.start("multitask", {"kind": "parent"})
    fold = RunRecord("f" * 32, "fold 2", "FINISHED", 0, {"fold": "2"}, {}, {"test_age_acc": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_id = tracker.log_pyfunc(parent, checkpoint, "model-fold2", {"fold": 2})
    hints = [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert not hints, hints

    # an MLflow 3 logged model, READY, made by and linked to the run
    logged = client.get_logged_model(model_id)
    assert logged.name == "model-fold2"
    assert logged.source_run_id == parent
    assert str(logged.status) == "READY"
    outputs = client.get_run(parent).outputs
    assert outputs is not None
    assert [o.model_id for o in outputs.model_outputs] == [model_id]
    # with a signature: the request's columns and the answer's
    folder = mlflow.artifacts.download_artifacts(
        logged.artifact_location, dst_path=str(tmp_path / "logged"), tracking_uri=tracker.uri
    )
    info = Model.load(folder)
    assert info.signature is not None
    inputs = info.signature.inputs.to_dict()
    assert [c["name"] for c in inputs] == ["image", "detect"]
    assert [c["required"] for c in inputs] == [True, False]
    out_names = {c["name"] for c in info.signature.outputs.to_dict()}
    assert {"image", "face", "status", "age", "age_probs", "gender", "gender_prob"} <= out_names
    # and an input example, in the serving request format
    assert info.saved_input_example_info is not None
    served = json.loads((Path(folder) / "serving_input_example.json").read_text())
    assert served["dataframe_split"]["columns"] == ["image", "detect"]

    model_text, version_text = champion_descriptions(
        "multitask", "suite-x", fold, 0.75, "val age_acc", 5
    )
    version = tracker.register(
        parent, "model-fold2", "lm-multitask", {}, (model_text, version_text), model_id
    )
    v = client.get_model_version("lm-multitask", version)
    assert v.source == logged.artifact_location  # a local store; `models:/<id>` on a server
    listed = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert listed == [{"name": "lm-multitask", "version": version}]
    assert v.run_id == parent  # the run that logged the model (a champion's: its fold run)
    assert v.description == version_text
    for words in ("suite-x", "fold 2", "val age_acc = 0.750000", "best of 5 folds"):
        assert words in v.description, words
    registered = client.get_registered_model("lm-multitask")
    assert registered.description == model_text
    assert variant_description("multitask") in registered.description
    # registering again is the same version
    assert tracker.register(parent, "model-fold2", "lm-multitask", {}, None, model_id) == version

    # the registered version loads and answers the input example's kind of request
    local = tracker.download(f"models:/lm-multitask/{version}", tmp_path / "dl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(str(local))
    hints = [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert not hints, hints
    image = next(small_synth.out.glob("aligned/*/*.jpg")).read_bytes()
    request = pd.DataFrame({"image": [base64.b64encode(image).decode()], "detect": [False]})
    (row,) = model.predict(request)
    assert row["status"] == "whole image", row
    assert re.fullmatch(r"\d+", str(row["image"]))


@pytest.mark.integration
def test_the_suites_runs_and_champions_on_the_stack(
    stack: Any, stack_suite: dict[str, Any], tmp_path: Path
) -> None:
    """The same through the tracking server (artifacts in S3), for what the suite logged."""
    url = stack_suite["mlflow"]
    client = MlflowClient(url)
    experiment_id = str(stack_suite["experiment_id"])
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment_id], max_results=1000)
    commits = subprocess.run(
        ["git", "rev-list", "--max-count=200", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout.split()
    kinds = {r.data.tags.get("kind") for r in runs}
    assert {"fold", "parent", "summary", "pretrain"} <= kinds, kinds
    for run in runs:
        tags = run.data.tags
        assert tags[mlflow_tags.MLFLOW_SOURCE_NAME] == "agegender", run.info.run_name
        assert tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "JOB", run.info.run_name
        commit = tags[mlflow_tags.MLFLOW_GIT_COMMIT]
        assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
        assert commit in commits, (run.info.run_name, commit)  # the code's, HEAD or an ancestor
        if tags["kind"] == "parent":
            assert variant_description(tags["variant"]) in tags[NOTE]
            assert STACK_SUITE in tags[NOTE]
        if tags["kind"] in ("summary", "pretrain"):
            assert tags[NOTE], run.info.run_name
        if tags["kind"] in ("fold", "pretrain"):  # what its numbers were measured on
            read = client.get_run(run.info.run_id)
            assert read.inputs is not None, run.info.run_name
            by_context = {
                {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
                for i in read.inputs.dataset_inputs
            }
            assert set(by_context) == {"train", "validation", "test"}, run.info.run_name
            metrics = read.data.metrics
            for context, size in (
                ("train", "n_train"),
                ("validation", "n_val"),
                ("test", "n_test"),
            ):
                dataset = by_context[context]
                assert dataset.digest == tags["data_fingerprint"][:8], run.info.run_name
                assert json.loads(str(dataset.profile))["num_rows"] == metrics[size]

    for variant, parent_id in stack_suite["parents"].items():
        name = f"agegender-{variant}"
        registered = client.get_registered_model(name)
        assert variant_description(variant) in registered.description
        version = client.get_model_version_by_alias(name, "champion")
        # the version is the logged model `<variant>-fold<k>`, which its fold run made
        source = str(version.source)
        assert source.startswith("models:/m-"), source
        model_id = source.removeprefix("models:/")
        logged = client.get_logged_model(model_id)
        assert logged.source_run_id == version.run_id == version.tags["fold_run_id"]
        assert logged.name == f"{variant}-fold{version.tags['fold']}"
        assert version.tags["parent_run_id"] == parent_id
        outputs = client.get_run(version.run_id).outputs
        assert outputs is not None
        assert model_id in [o.model_id for o in outputs.model_outputs]
        listed = json.loads(logged.tags["mlflow.modelVersions"])
        assert [m for m in listed if str(m["version"]) == str(version.version)], listed
        fold = version.tags["fold"]
        for words in (f"Suite `{STACK_SUITE}`", f"fold {fold}", "chosen by val", "best of 5"):
            assert words in str(version.description), (variant, words, version.description)
        # its signature: the request's columns, and the heads this variant answers with
        folder = mlflow.artifacts.download_artifacts(
            logged.artifact_location, dst_path=str(tmp_path / variant), tracking_uri=url
        )
        info = Model.load(folder)
        assert info.signature is not None
        assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "detect"]
        out = {c["name"] for c in info.signature.outputs.to_dict()}
        heads = {"age", "gender"} if variant.startswith("multitask") else {variant}
        assert out & {"age", "gender"} == heads, (variant, out)
        assert (Path(folder) / "serving_input_example.json").is_file()

    pretrained = client.get_registered_model("agegender-pretrained-celeba")
    assert "pretrained on celeba" in pretrained.description
    (first,) = client.search_model_versions("name = 'agegender-pretrained-celeba'")
    assert str(first.description).startswith(f"Pretraining run {first.run_id}")
