"""The suite's registered champions, served: `mlflow models serve` on the real stack answers JSON.

The suite deployment ran on the stack (`stack_suite`); its models live in the MLflow registry
with artifacts in S3. A real `mlflow models serve` process, started here as a user would, loads
`models:/agegender-multitask@champion` through the tracking server and answers requests.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from agegender.labels import AGE_GROUPS
from tests.conftest import REPO, client_env, free_port, serving

pytestmark = pytest.mark.integration
MODEL = "models:/agegender-multitask@champion"


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def served(stack: Any, stack_suite: dict[str, Any], tmp_path_factory: Any) -> Iterator[str]:
    """`mlflow models serve -m models:/agegender-multitask@champion`, in the project's env."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = ["mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = client_env(stack)  # the venv activated: mlflow runs `uvicorn` from PATH
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, env, REPO, log, url + "/ping"):
        yield url


def test_each_variant_has_a_champion_chosen_on_validation(
    stack: Any, stack_suite: dict[str, Any]
) -> None:
    client = MlflowClient(stack.mlflow_url)
    for variant, parent_id in stack_suite["parents"].items():
        version = client.get_model_version_by_alias(f"agegender-{variant}", "champion")
        assert version.tags["parent_run_id"] == parent_id
        folds = client.search_runs(
            [stack_suite["experiment_id"]],
            f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        )
        assert len(folds) == 5
        best = max(folds, key=lambda r: r.data.metrics["selection_score"])
        assert version.tags["fold_run_id"] == best.info.run_id, variant
        assert version.run_id == best.info.run_id, variant  # the version's source run


def test_a_served_champion_answers_json(
    stack: Any, served: str, photos: dict[str, Any], tmp_path: Path
) -> None:
    two = (photos["dir"] / "two.jpg").read_bytes()
    none = (photos["dir"] / "none.png").read_bytes()
    corrupt = (photos["dir"] / "corrupt.jpg").read_bytes()
    records = [
        {"image": base64.b64encode(two).decode()},
        {"image": base64.b64encode(none).decode()},
        {"image": "this is not base64!"},
        {"image": base64.b64encode(corrupt).decode()},
        {"image": base64.b64encode(two).decode(), "detect": False},
    ]
    status, body = _post(served + "/invocations", {"dataframe_records": records})
    assert status == 200, body
    rows = body["predictions"]
    assert [(r["image"], r["face"], r["status"]) for r in rows] == [
        (0, 0, "face"),
        (0, 1, "face"),
        (1, None, "no face"),
        (2, None, "error"),
        (3, None, "error"),
        (4, 0, "whole image"),
    ]
    assert rows[3]["error"].startswith("not base64")
    assert "truncated" in rows[4]["error"].lower()
    for row in (rows[0], rows[1], rows[5]):
        assert row["age"] in AGE_GROUPS
        assert set(row["age_probs"]) == set(AGE_GROUPS)
        assert row["gender"] in ("m", "f")
        assert row["gender_prob"] == max(row["gender_probs"].values())

    # the same answers as `agegender predict` with the same registered model
    agegender = str(Path(sys.executable).with_name("agegender"))
    cli = subprocess.run(
        [agegender, "predict", str(photos["dir"] / "two.jpg"), "--model", MODEL],
        env=client_env(stack),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [r["box"] for r in rows[:2]] == [e["box"] for e in expected]
    for got, want in zip(rows[:2], expected, strict=True):
        np.testing.assert_allclose(
            list(got["age_probs"].values()), list(want["age_probs"].values()), atol=1e-4
        )

    # a decoded photo as an array gives the same faces as its file
    pixels = np.asarray(Image.open(photos["dir"] / "two.jpg").convert("RGB"))
    status, body = _post(served + "/invocations", {"inputs": {"image": pixels[None].tolist()}})
    assert status == 200, body
    assert [r["box"] for r in body["predictions"]] == [r["box"] for r in rows[:2]]

    # the signature is checked before the model runs
    status, body = _post(served + "/invocations", {"dataframe_records": [{"picture": "x"}]})
    assert status >= 400
    assert "missing inputs ['image']" in json.dumps(body)
