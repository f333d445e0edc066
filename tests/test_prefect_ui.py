"""The Prefect UI, in a real headless browser, shows the suite's artifacts on its flow run.

The stack's suite deployment run (a real Prefect server with its UI, a worker, an MLflow server):
its flow-run page's Artifacts tab lists every artifact key, and a variant's fold table shows the
numbers MLflow holds for its folds. Screenshots: runs/test-artifacts/prefect-flow-run.png and
prefect-fold-table.png. Chromium setup as tests/test_mlflow_ui.py's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from mlflow import MlflowClient
from playwright.sync_api import expect

from tasks.artifacts import artifact_key
from tests.conftest import STACK_SUITE, prefect_api
from tests.test_mlflow_ui import ARTIFACTS, TIMEOUT_MS, browser_page, full_page_screenshot

VARIANTS = ("multitask", "multitask_pretrained", "age", "gender")
LINK = re.compile(r"^\[(?P<text>[^\]]*)\]\((?P<url>[^)]*)\)$")


def _artifacts(stack: Any, flow_run_id: str) -> tuple[Any, dict[str, Any]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    with prefect_api(stack), get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        artifacts = client.read_artifacts(flow_run_filter=only)
        assert run.deployment_id is not None
        schema = client.read_deployment(run.deployment_id).parameter_openapi_schema or {}
    # the run form of the deployment: every field described
    assert schema["properties"]
    for name, prop in schema["properties"].items():
        assert prop.get("description"), (name, prop)
    return run, {str(a.key): a for a in artifacts}


def _js(value: float | str) -> str:
    """A JSON number as the page prints it (JavaScript: 0.0 is `0`); `-` stays."""
    return value if isinstance(value, str) else f"{value:g}"


@pytest.mark.integration
def test_prefect_ui_shows_the_suites_artifacts(
    stack: Any, stack_suite: dict[str, Any], tmp_path: Path
) -> None:
    run, by_key = _artifacts(stack, stack_suite["flow_run_id"])
    assert re.fullmatch(rf"{STACK_SUITE}-\d{{4}}-\d\d-\d\d-\d{{4}}", run.name), run.name
    assert f"suite:{STACK_SUITE}" in run.tags, run.tags
    want = {artifact_key("suite", STACK_SUITE, what) for what in ("summary", "protocol")} | {
        artifact_key(STACK_SUITE, v, what)
        for v in VARIANTS
        for what in ("folds", "mlflow-run", "champion")
    }
    assert set(by_key) == want, sorted(by_key)

    # on a tracking server the links are the MLflow UI's own pages of runs and versions
    base, experiment = stack_suite["mlflow"], str(stack_suite["experiment_id"])
    mlflow = MlflowClient(base)
    for v in VARIANTS:
        link = LINK.match(str(by_key[artifact_key(STACK_SUITE, v, "mlflow-run")].data))
        assert link is not None
        parent = stack_suite["parents"][v]
        ml = "?workflowType=machine_learning"
        assert link["url"] == f"{base}/#/experiments/{experiment}/runs/{parent}{ml}"
        link = LINK.match(str(by_key[artifact_key(STACK_SUITE, v, "champion")].data))
        assert link is not None
        name, version = (
            link["url"].removeprefix(f"{base}/#/models/").removesuffix(ml).split("/versions/")
        )
        registered = mlflow.get_model_version(name, version)
        assert mlflow.get_run(str(registered.run_id)).data.tags["mlflow.parentRunId"] == parent
        assert str(mlflow.get_model_version_by_alias(name, "champion").version) == version

    # what the multitask table must show: its folds' test accuracy as MLflow holds it
    table_key = artifact_key(STACK_SUITE, "multitask", "folds")
    rows = json.loads(str(by_key[table_key].data))
    folds = mlflow.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{stack_suite['parents']['multitask']}'"
    )
    logged = {r.data.tags["fold"]: r.data.metrics["test_age_acc"] for r in folds}
    shown = {r["fold"]: r["age_acc"] for r in rows if r["fold"] in logged}
    assert shown == {f: round(v, 4) for f, v in logged.items()}

    ui = stack.prefect_api.removesuffix("/api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = [ARTIFACTS / "prefect-flow-run.png", ARTIFACTS / "prefect-fold-table.png"]
    for shot in shots:
        shot.unlink(missing_ok=True)
    with browser_page(tmp_path) as page:
        page.goto(f"{ui}/runs/flow-run/{stack_suite['flow_run_id']}")
        body = page.locator("body")
        expect(body).to_contain_text(run.name, timeout=TIMEOUT_MS)
        page.locator("li.p-tab#artifacts").click()
        section = page.get_by_text("Flow run", exact=True)  # the run's own, not a task's
        expect(section).to_be_visible(timeout=TIMEOUT_MS)
        for key in sorted(want):
            expect(body).to_contain_text(key, timeout=TIMEOUT_MS)
        full_page_screenshot(page, shots[0])  # the page scrolls inside: grow the viewport

        page.get_by_text(table_key, exact=True).first.click()
        expect(body).to_contain_text("age_acc", timeout=TIMEOUT_MS)
        lines = page.locator("tbody tr")
        expect(lines).to_have_count(len(rows), timeout=TIMEOUT_MS)
        for i, row in enumerate(rows):  # fold 0..4, mean, std: the values as JSON has them
            expect(lines.nth(i)).to_contain_text(row["fold"], timeout=TIMEOUT_MS)
            expect(lines.nth(i)).to_contain_text(_js(row["age_acc"]), timeout=TIMEOUT_MS)
        full_page_screenshot(page, shots[1])
    for shot in shots:
        assert shot.stat().st_size > 10_000, f"{shot}: {shot.stat().st_size} bytes"
