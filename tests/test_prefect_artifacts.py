"""What the Prefect UI shows of a suite, read back through Prefect's client: the artifacts on the
suite's flow run (tables equal to MLflow's fold metrics, links to runs and versions that exist),
the run's readable name and tags, and a described field for every flow parameter."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from agegender.cache import build_cache
from agegender.config import CacheConfig, load_config
from agegender.synth.adience import SynthResult
from tests.conftest import TINY_TRAIN
from tracking.store import Tracker

SUITE = "Artifacts_Check"  # not a valid artifact key as it is: the keys must be made valid
LINK = re.compile(r"^\[(?P<text>[^\]]*)\]\((?P<url>[^)]*)\)$")


def test_a_suite_leaves_its_results_on_its_flow_run(
    small_synth: SynthResult, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.suite import suite_flow
    from tasks.artifacts import LOCAL_UI

    build_cache(small_synth.out, tmp_path / "cache", config=CacheConfig(image_size=56))
    suite = {"name": SUITE, "variants": ["age"], "folds": [0, 1]}
    config = load_config(None, TINY_TRAIN).model_dump(mode="json")
    run_root = tmp_path / "runs"
    with prefect_test_harness(server_startup_timeout=600):
        state = suite_flow(str(tmp_path / "cache"), suite, config, str(run_root), return_state=True)
        assert state.is_completed(), state
        result: dict[str, Any] = state.result()
        flow_run_id = state.state_details.flow_run_id
        assert flow_run_id is not None
        only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            artifacts = client.read_artifacts(flow_run_filter=only_this_run)
            task_runs = client.read_task_runs(flow_run_filter=only_this_run)

    # a readable name and the suite's tag; the folds' task runs carry suite and variant
    assert re.fullmatch(rf"{SUITE}-\d{{4}}-\d\d-\d\d-\d{{4}}", run.name), run.name
    assert f"suite:{SUITE}" in run.tags, run.tags
    folds = [t for t in task_runs if re.fullmatch(r"age-fold\d", t.name)]
    assert sorted(t.name for t in folds) == ["age-fold0", "age-fold1"]
    for t in folds:
        assert {f"suite:{SUITE}", "variant:age"} <= set(t.tags), (t.name, t.tags)

    by_key = {a.key: a for a in artifacts}
    prefix = "artifacts-check"
    assert set(by_key) == {
        f"suite-{prefix}-summary",
        f"{prefix}-age-folds",
        f"{prefix}-age-mlflow-run",
        f"{prefix}-age-champion",
    }, sorted(map(str, by_key))
    # the flow run's own (an artifact made in a task run is listed under that task run)
    assert {(a.flow_run_id, a.task_run_id) for a in artifacts} == {(flow_run_id, None)}

    summary = by_key[f"suite-{prefix}-summary"]
    assert summary.type == "markdown"
    assert summary.data == result["summary"]["markdown"]
    assert f"suite `{SUITE}`" in str(summary.data)

    # the table: one row per fold equal to the fold's MLflow run, then mean and std
    mlflow = MlflowClient(Tracker(None, run_root).uri)
    parent = result["parents"]["age"]
    children = mlflow.search_runs(
        [result["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    fold_metrics = {
        r.data.tags["fold"]: {k: v for k, v in r.data.metrics.items() if k.startswith("test_")}
        for r in children
    }
    table = by_key[f"{prefix}-age-folds"]
    assert table.type == "table"
    rows = json.loads(str(table.data))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    for row in rows[:2]:
        logged = fold_metrics[row["fold"]]
        shown = {k: v for k, v in row.items() if k.startswith("test_")}
        assert set(shown) == set(logged)
        for k, v in logged.items():
            assert shown[k] == pytest.approx(v, abs=5e-5), (row["fold"], k)
    for k in rows[2]:
        if k.startswith("test_"):
            values = [fold_metrics[f][k] for f in ("0", "1")]
            assert rows[2][k] == pytest.approx(sum(values) / 2, abs=5e-5)
            assert rows[3][k] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=5e-5)

    # links: the parent run and the champion version, where `mlflow ui` (printed) serves them
    assert f"--port {LOCAL_UI.rsplit(':', 1)[1]}" in result["ui"]
    link = LINK.match(str(by_key[f"{prefix}-age-mlflow-run"].data))
    assert link is not None, by_key[f"{prefix}-age-mlflow-run"].data
    url = f"{LOCAL_UI}/#/experiments/{result['experiment_id']}/runs/{parent}"
    assert link["url"] == url
    got = mlflow.get_run(url.rsplit("/", 1)[1])
    assert (got.info.experiment_id, got.data.tags["variant"]) == (result["experiment_id"], "age")
    assert "mlflow ui --backend-store-uri" in str(by_key[f"{prefix}-age-mlflow-run"].description)
    link = LINK.match(str(by_key[f"{prefix}-age-champion"].data))
    assert link is not None
    champion = result["champions"]["age"]
    name, version = link["url"].split("/#/models/")[1].split("/versions/")
    assert (name, version) == (champion["name"], champion["version"])
    assert mlflow.get_model_version(name, version).run_id == parent
    assert str(mlflow.get_model_version_by_alias(name, "champion").version) == version


def test_every_flow_parameter_is_described() -> None:
    """The Prefect UI's run form shows each parameter with its description."""
    from prefect.utilities.callables import parameter_schema

    from flows.fold import train_fold_flow
    from flows.pretrain import pretrain_flow
    from flows.suite import cross_validate, suite_flow

    for flow in (suite_flow, cross_validate, train_fold_flow, pretrain_flow):
        schema = parameter_schema(flow.fn).model_dump()
        assert schema["properties"], flow.name
        for name, prop in schema["properties"].items():
            assert len(prop.get("description") or "") > 10, (flow.name, name, prop)
    suite = parameter_schema(cross_validate.fn).model_dump()["properties"]["suite"]
    assert "dict on purpose" in suite["description"].replace("\n", " ")


def test_artifact_keys_are_valid_prefect_keys() -> None:
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only

    from tasks.artifacts import artifact_key

    for parts, want in [
        (("suite", "agegender", "summary"), "suite-agegender-summary"),
        (("stack-e2e", "multitask_pretrained", "folds"), "stack-e2e-multitask-pretrained-folds"),
        (("My Suite!", "age", "champion"), "my-suite-age-champion"),
    ]:
        key = artifact_key(*parts)
        assert key == want
        assert raise_on_name_alphanumeric_dashes_only(key) == key
