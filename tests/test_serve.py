"""`agegender serve` as users and a hostile-but-fair tester meet it: a real server process (one
uvicorn worker) on a registered model in a real MLflow store, real HTTP, no mocks.

One server for the module (small limits, so that the limits are cheap to reach); the test of
credentials starts its own."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port, run_cli, serving

pytestmark = pytest.mark.integration

MAX_BYTES = 2_000_000  # the demo's largest photo in base64 JSON is ~250 KB
UPLOAD_S = 3.0
AUTH = "tester:correct-horse-battery"


def _agegender() -> str:
    return str(Path(sys.executable).with_name("agegender"))


def _serve_cmd(model: dict[str, Any], port: int, *extra: str) -> list[str]:
    return [
        _agegender(),
        "serve",
        "--model",
        model["uri"],
        "--run-root",
        str(model["run_root"]),
        "--port",
        str(port),
        "--device",
        "cpu",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env.pop("AGEGENDER_SERVE_AUTH", None)
    return env | extra


@pytest.fixture(scope="module")
def server(
    served_model_uri: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = _serve_cmd(
        served_model_uri,
        port,
        f"max_request_bytes={MAX_BYTES}",
        f"upload_timeout_s={UPLOAD_S}",
    )
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, _env(), REPO, log, url + "/ping"):
        yield {"port": port, "url": url, "log": log}


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos `make demo` makes (`agegender synth --format photos --count 12`)."""
    out = tmp_path_factory.mktemp("demo-photos")
    res = run_cli("synth", "--format", "photos", "--out", out, "--count", "12")
    assert res.returncode == 0, res.stderr
    return out


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _raw(port: int, head: str, body_chunks: Iterator[bytes] | None = None) -> bytes:
    """Send `head` (and then `body_chunks`, while the server still reads) on a raw socket;
    what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head.encode())
        if body_chunks is not None:
            try:
                for chunk in body_chunks:
                    s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        out = b""
        try:
            while b"\r\n\r\n" not in out or not out.endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    break
                out += data
        except ConnectionResetError:
            pass
        return out


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = _request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _readme_block() -> str:
    """README's curl example: the code block after the `make serve` one in its serving part."""
    text = (REPO / "README.md").read_text()
    part = text[text.index("### Serving") :]
    blocks = re.findall(r"```bash\n(.*?)```", part, re.S)
    (block,) = [b for b in blocks if "curl" in b][:1]
    return str(block)


def test_the_readme_example_answers_the_demos_largest_photo_as_predict_does(
    server: dict[str, Any],
    served_model_uri: dict[str, Any],
    demo_photos: Path,
    tmp_path: Path,
) -> None:
    largest = max(demo_photos.glob("*.jpg"), key=lambda p: p.stat().st_size)
    assert largest.stat().st_size > 128 * 1024 * 3 // 4  # its base64 exceeds one argument's limit
    (tmp_path / "photo.jpg").write_bytes(largest.read_bytes())
    block = _readme_block().replace("5001", str(server["port"]))
    res = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["predictions"]
    cli = run_cli(
        "predict", largest, "--model", served_model_uri["uri"], "--run-root",
        served_model_uri["run_root"], "--device", "cpu",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [(r["image"], r["face"], r["box"], r["status"]) for r in rows] == [
        (0, e["face"], e["box"], e["status"]) for e in expected
    ]
    for got, want in zip(rows, expected, strict=True):
        for head in ("age", "gender"):
            if want.get(f"{head}_probs"):
                np.testing.assert_allclose(
                    list(got[f"{head}_probs"].values()),
                    list(want[f"{head}_probs"].values()),
                    atol=1e-4,
                )


def test_bodies_over_the_limit_get_413_before_they_are_read(server: dict[str, Any]) -> None:
    port = server["port"]
    # a huge Content-Length and no body at all: the answer comes without a byte of it
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    )
    answer = _raw(port, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {
        "error_code": "REQUEST_ENTITY_TOO_LARGE",
        "message": f"the request's body is 10000000000 bytes, over the limit of {MAX_BYTES} "
        "bytes (max_request_bytes); send fewer or smaller photos per request",
    }
    # a chunked body: 413 once its count passes the limit (the rest is never read)
    chunk = b"x" * 65536
    frames = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3 * MAX_BYTES // len(chunk)))
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer = _raw(port, head, frames)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"over the limit of 2000000 bytes" in answer


def test_a_slow_upload_gets_408_and_one_log_line(server: dict[str, Any]) -> None:
    port = server["port"]
    before = len(_log_lines(server["log"]))
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": '
    )
    answer = _raw(port, head)  # the rest of the body never comes
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"was not in within 3 s (11 bytes came)" in answer
    time.sleep(0.5)  # the log line is written after the answer
    new = _log_lines(server["log"])[before:]
    assert len(new) == 1, new
    assert '"POST /invocations" 408' in new[0]


def test_content_type_and_host_are_checked_before_the_body(server: dict[str, Any]) -> None:
    port = server["port"]
    status, _, body = _request(port, "POST", "/invocations", b'{"inputs": []}')
    assert status == 415
    assert json.loads(body)["message"] == (
        "no Content-Type: send application/json (MLflow's scoring formats) or text/csv"
    )
    status, _, body = _request(
        port, "POST", "/invocations", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415
    assert "'application/x-www-form-urlencoded' is not accepted" in json.loads(body)["message"]
    status, _, body = _request(port, "GET", "/model", headers={"Host": "evil.example"})
    assert (status, json.loads(body)["message"]) == (400, "unknown Host")
    status, _, body = _request(port, "GET", "/model", headers={"Host": "localhost:1"})
    assert status == 400  # loopback, but not our port
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert _request(port, "GET", "/ping", headers={"Host": host})[0] == 200, host


def test_model_says_what_it_serves_and_ping_waited_for_the_warm_up(
    server: dict[str, Any], served_model_uri: dict[str, Any]
) -> None:
    status, _, body = _request(server["port"], "GET", "/model")
    assert status == 200
    info = json.loads(body)
    want = served_model_uri
    assert {k: info[k] for k in ("name", "version", "alias", "run_id", "config_hash")} == {
        "name": want["name"],
        "version": want["version"],
        "alias": "champion",
        "run_id": want["run_id"],
        "config_hash": want["config_hash"],
    }
    assert (info["image_size"], info["crop"], info["device"]) == (56, 48, "cpu")
    assert set(info["labels"]) == {"age", "gender"}
    assert info["limits"]["max_request_bytes"] == MAX_BYTES
    assert info["ready"] is True
    # readiness: every /ping before the warm-up's end was 503, none after
    lines = _log_lines(server["log"])
    ready = next(i for i, line in enumerate(lines) if "ready: warm-up prediction done" in line)
    pings = [(i, line) for i, line in enumerate(lines) if '"GET /ping"' in line]
    assert all(" 503 " in line for i, line in pings if i < ready), pings
    assert all(" 200 " in line for i, line in pings if i > ready), pings
    assert _request(server["port"], "GET", "/version")[2].decode() == _mlflow_version()


def _mlflow_version() -> str:
    import mlflow

    return str(mlflow.__version__)


def test_metrics_and_the_access_log_count_what_was_sent(
    server: dict[str, Any], photos: dict[str, Any]
) -> None:
    port = server["port"]
    before = _metrics(port)
    images = [
        base64.b64encode((photos["dir"] / name).read_bytes()).decode()
        for name in ("two.jpg", "none.png", "corrupt.jpg")
    ]
    body = json.dumps({"dataframe_records": [{"image": i} for i in images]}).encode()
    faces = 0
    for _ in range(2):
        status, _, answer = _request(
            port, "POST", "/invocations", body, {"Content-Type": "application/json"}
        )
        assert status == 200, answer
        faces += sum(r["face"] is not None for r in json.loads(answer)["predictions"])
    assert _request(port, "POST", "/invocations", b"{}")[0] == 415
    after = _metrics(port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = {"path": "/invocations", "status": "200"}
    assert delta("agegender_requests_total", **ok) == 2
    assert delta("agegender_request_seconds_count", **ok) == 2
    assert delta("agegender_requests_total", path="/invocations", status="415") == 1
    assert delta("agegender_photos_total") == 6
    assert faces > 0
    assert delta("agegender_faces_total") == faces
    assert delta("agegender_errors_total", kind="content_type") == 1
    assert ("agegender_queue_depth", ()) in after
    assert after[("agegender_body_bytes_in_flight", ())] == 0
    last = [line for line in _log_lines(server["log"]) if '"POST /invocations" 200' in line][-1]
    assert re.search(r'127\.0\.0\.1 "POST /invocations" 200 \d+ bytes \d+\.\d ms$', last), last


def test_beyond_loopback_only_with_credentials_and_they_are_checked(
    served_model_uri: dict[str, Any], tmp_path: Path
) -> None:
    refused = subprocess.run(
        _serve_cmd(served_model_uri, free_port(), "--host", "0.0.0.0"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 listens beyond this machine, and anyone who reaches it could use "
        "the model: set AGEGENDER_SERVE_AUTH=user:password (a password of 12+ characters) in the "
        "environment or .env, as `stack up --listen` asks for credentials"
    ]
    port = free_port()
    cmd = _serve_cmd(served_model_uri, port)
    env = _env(AGEGENDER_SERVE_AUTH=AUTH)
    with serving(cmd, env, REPO, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping"):
        good = "Basic " + base64.b64encode(AUTH.encode()).decode()
        bad = "Basic " + base64.b64encode(b"tester:wrong-password!!").decode()
        json_type = {"Content-Type": "application/json"}
        for headers in ({}, {"Authorization": bad}):
            status, head, body = _request(
                port, "POST", "/invocations", b'{"inputs": []}', headers | json_type
            )
            assert status == 401, body
            assert head["www-authenticate"] == 'Basic realm="agegender"'
            assert json.loads(body)["message"] == "credentials required (HTTP basic)"
        assert _request(port, "GET", "/model")[0] == 401
        assert _request(port, "GET", "/model", headers={"Authorization": good})[0] == 200
