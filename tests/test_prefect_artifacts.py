"""What the Prefect UI shows of a suite, read back through Prefect's client: the artifacts on the
suite's flow run (tables equal to MLflow's fold metrics, links to runs and versions that exist),
the run's readable name and tags, and a described field for every flow parameter; then the
links opened in headless Chromium, with the printed `mlflow ui` serving the suite's SQLite store
on a port that is not MLflow's default (screenshots: runs/test-artifacts/pages/)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from agegender.cache import build_cache
from agegender.config import CacheConfig, load_config
from agegender.report import is_interval
from agegender.synth.adience import SynthResult
from tests.conftest import REPO, TINY_TRAIN, free_port, serving
from tests.test_mlflow_ui import TIMEOUT_MS, browser_page
from tracking.store import UI_PORT_VAR, Tracker

SUITE = "Artifacts_Check"  # not a valid artifact key as it is: the keys must be made valid
LINK = re.compile(r"^\[(?P<text>[^\]]*)\]\((?P<url>[^)]*)\)$")
PREFIX = "artifacts-check"
ML = "workflowType=machine_learning"
PAGES = REPO / "runs" / "test-artifacts" / "pages"


@pytest.fixture(scope="module")
def local_suite(
    small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One tiny suite (age, folds 0 and 1) on a local SQLite store, run once for this module's
    tests, with the MLflow UI's port set to a free one (not 5000): what its artifacts say."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.suite import suite_flow

    tmp_path = tmp_path_factory.mktemp("artifacts")
    port = str(free_port())
    saved = os.environ.get(UI_PORT_VAR)
    os.environ[UI_PORT_VAR] = port
    build_cache(small_synth.out, tmp_path / "cache", config=CacheConfig(image_size=56))
    suite = {"name": SUITE, "variants": ["age"], "folds": [0, 1]}
    config = load_config(None, TINY_TRAIN).model_dump(mode="json")
    run_root = tmp_path / "runs"
    try:
        with prefect_test_harness(server_startup_timeout=600):
            state = suite_flow(
                str(tmp_path / "cache"), suite, config, str(run_root), return_state=True
            )
            assert state.is_completed(), state
            flow_run_id = state.state_details.flow_run_id
            assert flow_run_id is not None
            only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(flow_run_id)
                artifacts = client.read_artifacts(flow_run_filter=only_this_run)
                task_runs = client.read_task_runs(flow_run_filter=only_this_run)
        yield {
            "result": state.result(),
            "flow_run_id": flow_run_id,
            "run": run,
            "by_key": {a.key: a for a in artifacts},
            "artifacts": artifacts,
            "task_runs": task_runs,
            "run_root": run_root,
            "port": port,
            "tracker": Tracker(SUITE, run_root),
        }
    finally:
        if saved is None:
            os.environ.pop(UI_PORT_VAR, None)
        else:
            os.environ[UI_PORT_VAR] = saved


def test_a_suite_leaves_its_results_on_its_flow_run(local_suite: dict[str, Any]) -> None:
    result, run, by_key = local_suite["result"], local_suite["run"], local_suite["by_key"]
    flow_run_id, run_root = local_suite["flow_run_id"], local_suite["run_root"]
    artifacts, task_runs = local_suite["artifacts"], local_suite["task_runs"]

    # a readable name and the suite's tag; the folds' task runs carry suite and variant
    assert re.fullmatch(rf"{SUITE}-\d{{4}}-\d\d-\d\d-\d{{4}}", run.name), run.name
    assert f"suite:{SUITE}" in run.tags, run.tags
    folds = [t for t in task_runs if re.fullmatch(r"age-fold\d", t.name)]
    assert sorted(t.name for t in folds) == ["age-fold0", "age-fold1"]
    for t in folds:
        assert {f"suite:{SUITE}", "variant:age"} <= set(t.tags), (t.name, t.tags)

    prefix = PREFIX
    assert set(by_key) == {
        f"suite-{prefix}-summary",
        f"suite-{prefix}-protocol",
        f"{prefix}-age-folds",
        f"{prefix}-age-mlflow-run",
        f"{prefix}-age-champion",
    }, sorted(map(str, by_key))
    # the flow run's own (an artifact made in a task run is listed under that task run)
    assert {(a.flow_run_id, a.task_run_id) for a in artifacts} == {(flow_run_id, None)}

    summary = by_key[f"suite-{prefix}-summary"]
    assert summary.type == "markdown"
    assert summary.data == result["summary"]["narrow_markdown"]
    assert f"suite `{SUITE}`" in str(summary.data)
    # narrow: the protocol and the variants' descriptions are the other artifact's
    assert "| protocol |" in result["summary"]["markdown"]
    assert "| protocol |" not in str(summary.data)
    assert "| setting | ours | Levi & Hassner |" in str(by_key[f"suite-{prefix}-protocol"].data)

    # the table: one row per fold equal to the fold's MLflow run, then mean and std
    mlflow = MlflowClient(Tracker(None, run_root).uri)
    parent = result["parents"]["age"]
    children = mlflow.search_runs(
        [result["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    fold_metrics = {
        r.data.tags["fold"]: {k[5:]: v for k, v in r.data.metrics.items() if k.startswith("test_")}
        for r in children
    }
    table = by_key[f"{prefix}-age-folds"]
    assert table.type == "table"
    rows = json.loads(str(table.data))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    assert "seeds" not in rows[0]  # one run per fold: no column that says so
    for row in rows[:2]:
        # a fold's bootstrap bounds are logged with it, bracket its accuracy, and are no column
        bounds = {k: v for k, v in fold_metrics[row["fold"]].items() if is_interval(k)}
        logged = {k: v for k, v in fold_metrics[row["fold"]].items() if k not in bounds}
        accuracies = [k for k in logged if k.removesuffix("_10crop") in ("age_acc", "age_1off")]
        assert accuracies, logged
        for k in accuracies:
            crop = "_10crop" if k.endswith("_10crop") else ""
            metric = k.removesuffix("_10crop")
            low, high = bounds[f"{metric}_ci_low{crop}"], bounds[f"{metric}_ci_high{crop}"]
            assert low <= logged[k] <= high, (k, low, logged[k], high)
        shown = {k: v for k, v in row.items() if k not in ("fold", "n_test")}
        assert set(shown) == set(logged)
        for k, v in logged.items():
            assert shown[k] == pytest.approx(v, abs=5e-5), (row["fold"], k)
    for k in rows[2]:
        if k not in ("fold", "n_test"):
            values = [fold_metrics[f][k] for f in ("0", "1")]
            assert rows[2][k] == pytest.approx(sum(values) / 2, abs=5e-5)
            assert rows[3][k] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=5e-5)

    # links: the parent run and the champion version, where `mlflow ui` (printed) serves them
    base = f"http://127.0.0.1:{local_suite['port']}"
    assert f"--port {local_suite['port']}," in result["ui"]
    assert result["ui"].split(", then open ")[1].startswith(f"{base}/#/experiments/")
    link = LINK.match(str(by_key[f"{prefix}-age-mlflow-run"].data))
    assert link is not None, by_key[f"{prefix}-age-mlflow-run"].data
    url = f"{base}/#/experiments/{result['experiment_id']}/runs/{parent}?{ML}"
    assert link["url"] == url
    got = mlflow.get_run(parent)
    assert (got.info.experiment_id, got.data.tags["variant"]) == (result["experiment_id"], "age")
    # the command in a code span, the rest outside it
    description = str(by_key[f"{prefix}-age-mlflow-run"].description)
    assert re.search(r"run `mlflow ui --backend-store-uri [^`]*--port \d+` first", description)
    link = LINK.match(str(by_key[f"{prefix}-age-champion"].data))
    assert link is not None
    champion = result["champions"]["age"]
    name, version = link["url"].split("/#/models/")[1].removesuffix(f"?{ML}").split("/versions/")
    assert (name, version) == (champion["name"], champion["version"])
    # the version's run is the fold run it is; the parent is a tag
    registered = mlflow.get_model_version(name, version)
    fold_run = mlflow.get_run(str(registered.run_id))
    assert fold_run.data.tags["mlflow.parentRunId"] == parent
    assert fold_run.data.tags["fold"] == str(champion["fold"])
    assert registered.tags["parent_run_id"] == parent
    assert str(mlflow.get_model_version_by_alias(name, "champion").version) == version
    # the logged model is the fold run's, named by variant and fold
    (model,) = mlflow.search_logged_models([result["experiment_id"]])
    assert (model.name, model.source_run_id) == (
        f"age-fold{champion['fold']}",
        fold_run.info.run_id,
    )
    # the description's number is the validation loss as measured (positive), not its score
    loss = fold_run.data.metrics["selected_val_loss"]
    chosen = re.search(r"chosen by val loss[^=]* = (-?[0-9.]+)", str(registered.description))
    assert chosen is not None, registered.description
    assert float(chosen[1]) == pytest.approx(loss, abs=1e-6)
    assert loss > 0
    # the parent: which folds (a tag, no constant metric) and its table in its description
    parent_run = mlflow.get_run(parent)
    assert "folds" not in parent_run.data.metrics
    assert parent_run.data.tags["folds"] == "0, 1"
    assert "| test_age_acc |" in parent_run.data.tags["mlflow.note.content"]


@pytest.mark.integration
def test_the_links_open_model_training_pages(local_suite: dict[str, Any], tmp_path: Path) -> None:
    """The printed `mlflow ui` command on the port the links name; each page in MLflow's
    model-training layout (a fresh browser's default is GenAI: "Evaluations", "Judges")."""
    from playwright.sync_api import expect

    result, by_key, tracker = local_suite["result"], local_suite["by_key"], local_suite["tracker"]
    port = local_suite["port"]
    assert port != "5000"
    champion = result["champions"]["age"]
    client = tracker.client
    version = client.get_model_version(champion["name"], champion["version"])
    fold_run = client.get_run(str(version.run_id))
    links = {
        "experiment": result["ui"].split(", then open ")[1],
        "parent-run": LINK.match(str(by_key[f"{PREFIX}-age-mlflow-run"].data))["url"],  # type: ignore[index]
        "champion-version": LINK.match(str(by_key[f"{PREFIX}-age-champion"].data))["url"],  # type: ignore[index]
        "fold-run": tracker.run_url(fold_run.info.run_id),
    }
    command = shlex.split(tracker.serve_command())
    command[0] = str(Path(sys.executable).with_name("mlflow"))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    PAGES.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with (
        serving(command, env, REPO, tmp_path / "ui.log", f"{base}/health"),
        browser_page(tmp_path) as page,
    ):
        for name, url in links.items():
            assert url.startswith(f"{base}/#/"), url
            assert ML in url.split("?")[1].split("&"), url
            page.goto(url)
            body = page.locator("body")
            if name == "experiment":  # the runs table, its parent run by name
                header = page.get_by_role("columnheader", name="Run Name").first
                expect(header).to_be_visible(timeout=TIMEOUT_MS)
                expect(page.get_by_role("link", name="age", exact=True).first).to_be_visible()
                # our shared view: the test metrics are columns, not under "Columns"
                for column in ("test_age_acc_mean", "test_age_acc_std"):
                    mean = page.get_by_role("columnheader", name=column, exact=True)
                    expect(mean.first).to_be_visible(timeout=TIMEOUT_MS)
            elif name == "champion-version":  # its source run is the fold run
                expect(body).to_contain_text("Source Run:", timeout=TIMEOUT_MS)
                source = page.get_by_role("link", name=fold_run.info.run_name, exact=True)
                expect(source.first).to_be_visible(timeout=TIMEOUT_MS)
                loss = f"{fold_run.data.metrics['selected_val_loss']:.6f}"
                expect(body).to_contain_text(f"= {loss}", timeout=TIMEOUT_MS)
            else:
                expect(body).to_contain_text("Model metrics", timeout=TIMEOUT_MS)
            if name == "fold-run":  # its model: registered, named by variant and fold
                model = f"age-fold{champion['fold']}"
                expect(body).to_contain_text(model, timeout=TIMEOUT_MS)
                expect(body).to_contain_text(champion["name"], timeout=TIMEOUT_MS)
            page.screenshot(path=str(PAGES / f"mlflow-{name}.png"), animations="disabled")
            for genai in ("Evaluations", "Judges"):
                expect(body).not_to_contain_text(genai, timeout=TIMEOUT_MS)
    for name in links:
        assert (PAGES / f"mlflow-{name}.png").stat().st_size > 10_000, name


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
