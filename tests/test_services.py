"""`deployments.services`: the one health check, the one set of client defaults, and the ops
room's imports (none of the orchestration's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.services import DEFAULTS, MLFLOW_USER_VAR, apply_defaults, health, mlflow_problem
from tests.conftest import REPO

HITS: list[str] = []  # the paths asked of the server, in order


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        # /api/health and an MLflow at /ml answer 200, /sick/health 503, anything else 404
        HITS.append(self.path)
        ok = ("/api/health", "/ml/health", "/ml/api/2.0/mlflow/experiments/search?max_results=1")
        code = 200 if self.path in ok else {"/sick/health": 503}.get(self.path, 404)
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free one
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_health_is_none_when_healthy_else_says_what_is_wrong(server: str) -> None:
    assert health(f"{server}/api") is None
    assert health(f"{server}/api/") is None
    assert health(f"{server}/sick") == "HTTP 503 Service Unavailable"
    assert health(server) == "HTTP 404 Not Found"
    refused = health("http://127.0.0.1:9", timeout=5)
    assert "refused" in str(refused).lower()
    assert str(health("127.0.0.1:5000")).startswith("unknown url type")  # no http://


def test_mlflow_is_probed_once_per_process_server_and_credentials(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command checks MLflow before its flow, then every Tracker would again: once is
    enough while the answer was yes; a server that did not answer is asked again."""
    monkeypatch.delenv(MLFLOW_USER_VAR, raising=False)
    HITS.clear()
    for _ in range(3):
        assert mlflow_problem(f"{server}/ml") is None
    assert HITS == ["/ml/health", "/ml/api/2.0/mlflow/experiments/search?max_results=1"]
    monkeypatch.setenv(MLFLOW_USER_VAR, "someone-else")  # other credentials: asked again
    assert mlflow_problem(f"{server}/ml") is None
    assert len(HITS) == 4
    for _ in range(2):
        problem = mlflow_problem(f"{server}/sick", "MLFLOW_TRACKING_URI")
        assert problem == (
            f"MLflow at {server}/sick is unreachable (HTTP 503 Service Unavailable); is it "
            "running (`agegender stack status`) and MLFLOW_TRACKING_URI right?"
        )
    assert HITS[4:] == ["/sick/health", "/sick/health"]


def test_defaults_fill_only_what_the_user_did_not_set() -> None:
    env = {"DO_NOT_TRACK": "false"}
    apply_defaults(env)
    assert env == DEFAULTS | {"DO_NOT_TRACK": "false"}


def test_commands_run_with_the_defaults() -> None:
    """`make serve` runs `mlflow models serve` through `python -m deployments.services`."""
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS} | {"DO_NOT_TRACK": "1"}
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    res = subprocess.run(
        [sys.executable, "-m", "deployments.services", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
        check=True,
    )
    seen = json.loads(res.stdout)
    assert {k: seen[k] for k in DEFAULTS} == DEFAULTS | {"DO_NOT_TRACK": "1"}


def test_the_ops_room_imports_no_orchestration() -> None:
    """`deployments` imports the library and itself only; `services` the standard library only
    (tasks import it before Prefect loads)."""
    code = (
        "import sys, deployments.{0}; "
        "print(sorted({{m.split('.')[0] for m in sys.modules}} & set({1!r})))"
    )
    for module, banned in (
        ("services", {"agegender", "tasks", "flows", "tracking", "prefect", "mlflow", "pydantic"}),
        ("cli", {"tasks", "flows", "tracking", "prefect", "mlflow"}),
        ("stack", {"tasks", "flows", "tracking", "prefect", "mlflow"}),
    ):
        res = subprocess.run(
            [sys.executable, "-c", code.format(module, sorted(banned))],
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONPATH": str(REPO)},
            cwd=REPO,
            check=True,
        )
        assert res.stdout.strip() == "[]", (module, res.stdout)
