"""Servers that ask who calls (`agegender stack up` with credentials, as `--listen` needs them):
Prefect's basic auth, MLflow's basic-auth app (admin, worker, read-only reader), S3's signed
requests. One real stack on loopback with authentication on; the `--listen` refusal and the
worker's settings need no server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.credentials import AUTH_VARS, Auth, auth_settings, credentials
from deployments.layout import Ports
from deployments.mlflow_users import MlflowAdmin, UsersError
from deployments.s3 import list_objects
from deployments.services import StackError, basic_auth
from deployments.stack import Stack
from tests.conftest import REPO, opened_by_nobody

pytestmark = pytest.mark.integration

AGEGENDER = Path(sys.executable).with_name("agegender")


def _secrets() -> dict[str, str]:
    """Fresh credentials: S3's (servers only) and the four passwords of `Auth`."""
    return {
        "AWS_ACCESS_KEY_ID": "agegender-" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "PREFECT_API_AUTH_STRING": "agegender:" + secrets.token_hex(12),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-" + secrets.token_hex(12),
        "AGEGENDER_MLFLOW_WORKER_PASSWORD": "worker-" + secrets.token_hex(12),
        "AGEGENDER_MLFLOW_READER_PASSWORD": "reader-" + secrets.token_hex(12),
    }


def _clean_env() -> dict[str, str]:
    """This process's environment without any credential (what a stranger has)."""
    drop = (*AUTH_VARS, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [str(AGEGENDER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def auth_stack() -> Iterator[tuple[Stack, dict[str, str]]]:
    """A whole stack (servers, pools, deployments, worker) with authentication on, its
    credentials in the environment only while it starts (its worker keeps the worker's)."""
    values = _secrets()
    saved = {k: os.environ.get(k) for k in values}
    # ports beside the `stack` fixture's (+101), which may run in the same session
    shift = 111 + int(os.environ.get("AGEGENDER_TEST_PORT_SHIFT", "0"))
    run_dir = Path(tempfile.mkdtemp(prefix="agegender-test-auth-"))
    run_dir.chmod(0o711)  # PostgreSQL's own user reaches its data folder when run as root
    db = os.environ.get("AGEGENDER_TEST_DB", "postgres")
    st = Stack(run_dir / "stack", ports=Ports.shifted(shift), db=db, heartbeat_s=30, auth=True)
    os.environ.update(values)
    try:
        st.up(progress=lambda m: print(f"auth stack: {m}"))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield st, values
    finally:
        os.environ.update(values)  # `down` asks the Prefect API nothing, but be whole
        st.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(run_dir, ignore_errors=True)


def _status(url: str, body: Any = None, auth: str | None = None) -> int:
    """One request's HTTP status (GET, or POST with a JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} | (basic_auth(auth) if auth else {})
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _login(values: dict[str, str], user: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's MLflow clients log in as `worker` or `reader` from now on (MLflow reads
    the variables at each request)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv(
        "MLFLOW_TRACKING_PASSWORD", values[f"AGEGENDER_MLFLOW_{user.upper()}_PASSWORD"]
    )


def _written_by_worker(
    auth_stack: tuple[Stack, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    experiment: str,
    artifact: str,
    acc: float,
) -> tuple[str, Any]:
    """As the worker user: an experiment, a finished run with metric `acc` and a text artifact
    (whose content is the experiment's name)."""
    from mlflow.tracking import MlflowClient

    st, values = auth_stack
    _login(values, "worker", monkeypatch)
    client = MlflowClient(st.mlflow_url)
    exp = client.create_experiment(experiment)
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "acc", acc)
    note = st.run_dir / artifact
    note.write_text(experiment)
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return exp, run


def test_unauthenticated_requests_are_refused(auth_stack: tuple[Stack, dict[str, str]]) -> None:
    """No credentials: Prefect's API 401, MLflow's REST 401, S3 403; health checks stay open
    (the stack's and the CLI's reachability checks use them)."""
    st, values = auth_stack
    assert _status(st.prefect_api + "/flows/filter", {}) == 401
    assert _status(st.prefect_api + "/work_pools/filter", {}) == 401
    assert _status(st.prefect_api + "/health") == 200
    search = st.mlflow_url + "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _status(search) == 401
    assert _status(search, auth="worker:not-the-password") == 401
    assert _status(st.mlflow_url + "/health") == 200
    assert st.s3_public_url == st.s3_url  # on loopback: the relay's own test is below
    assert _status(f"{st.s3_url}/{st.bucket}/") == 403
    assert _status(f"{st.s3_url}/") == 403
    # the right credentials open the same doors
    assert _status(st.prefect_api + "/flows/filter", {}, values["PREFECT_API_AUTH_STRING"]) == 200
    assert _status(search, auth="worker:" + values["AGEGENDER_MLFLOW_WORKER_PASSWORD"]) == 200


def test_authenticated_clients_work(
    auth_stack: tuple[Stack, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack's worker came online through the auth (the fixture waits for it); Prefect's
    own CLI with the auth string sees the pools; the worker user writes a run whose artifact
    lands in the bucket through MLflow's proxy."""

    st, values = auth_stack
    assert not st.healthy("worker")  # the stack's own API calls: no credentials, no answer
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", values["PREFECT_API_AUTH_STRING"])
    assert st.healthy("worker")
    env = _clean_env() | st.client_env()
    env["PREFECT_HOME"] = str(st.run_dir / "cli-home")
    prefect = str(Path(sys.executable).with_name("prefect"))
    res = subprocess.run(
        [prefect, "work-pool", "ls"], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode != 0
    assert "401" in res.stdout + res.stderr
    env["PREFECT_API_AUTH_STRING"] = values["PREFECT_API_AUTH_STRING"]
    res = subprocess.run(
        [prefect, "work-pool", "ls"], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "local" in res.stdout
    assert "gpu" in res.stdout

    _, run = _written_by_worker(auth_stack, monkeypatch, "auth-written", "note.txt", 0.5)
    s3 = {k: values[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    keys = list_objects(st.s3_url, s3, st.bucket)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_reader_reads_but_writes_nothing(
    auth_stack: tuple[Stack, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look-only user sees the worker's experiment, run, metric and artifact, and gets
    403 for a new experiment, a run, a metric, a registered model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    st, values = auth_stack
    exp, run = _written_by_worker(auth_stack, monkeypatch, "auth-read-only", "seen.txt", 0.25)
    _login(values, "reader", monkeypatch)
    reader = MlflowClient(st.mlflow_url)
    assert reader.get_experiment(exp).name == "auth-read-only"
    assert reader.get_run(run.info.run_id).data.metrics["acc"] == 0.25
    got = reader.download_artifacts(run.info.run_id, "seen.txt", str(st.run_dir / "got"))
    assert Path(got).read_text() == "auth-read-only"
    attempts = {
        "experiment": lambda: reader.create_experiment("reader-made"),
        "run": lambda: reader.create_run(exp),
        "metric": lambda: reader.log_metric(run.info.run_id, "acc", 1.0),
        "model": lambda: reader.create_registered_model("reader-model"),
    }
    for attempt in attempts.values():
        with pytest.raises(MlflowException, match="403"):
            attempt()
    assert reader.get_run(run.info.run_id).data.metrics["acc"] == 0.25
    assert reader.get_experiment_by_name("reader-made") is None


def test_wrong_credentials_are_one_clear_error(
    auth_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    """A client with wrong or no credentials: one `error:` line naming the variable to fix,
    before any flow starts; no traceback. The admin password MLflow no longer takes too."""
    st, values = auth_stack
    base = _clean_env() | st.client_env() | {"PREFECT_HOME": str(tmp_path / "home")}
    suite = ["suite", "--cache", str(tmp_path / "cache"), "--run-root", str(tmp_path / "runs")]
    suite.append("suite.variants=[age]")
    cases = {
        "PREFECT_API_AUTH_STRING": {"PREFECT_API_AUTH_STRING": "agegender:wrong-password"},
        "PREFECT_API_AUTH_STRING is not set": {},
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD": {
            "PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"],
            "MLFLOW_TRACKING_USERNAME": "worker",
            "MLFLOW_TRACKING_PASSWORD": "wrong-password-123",
        },
    }
    for named, extra in cases.items():
        res = _cli(*suite, env=base | extra)
        said = res.stdout + res.stderr
        assert res.returncode != 0, said
        assert "Traceback" not in said, said
        errors = [line for line in said.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, said
        assert named in said, said
        assert not (tmp_path / "runs").exists()  # failed before anything ran
    with pytest.raises(UsersError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        MlflowAdmin(st.mlflow_url, ("admin", "not-the-admin-password")).check_admin()


def test_no_secret_is_written(auth_stack: tuple[Stack, dict[str, str]]) -> None:
    """No password in the logs, the state file, prefect.yaml, `stack status --json` or the
    MLflow auth app's config (0600); the reader and worker exist, named in status only."""
    st, values = auth_stack
    hidden = [v for k, v in values.items() if k != "AWS_ACCESS_KEY_ID"]
    hidden.append(values["PREFECT_API_AUTH_STRING"].split(":", 1)[1])
    env = _clean_env() | {"PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"]}
    status = _cli("stack", "status", "--json", "--run-dir", str(st.run_dir), env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["auth"] is True
    written = {"status --json": status.stdout + status.stderr}
    for path in [*st.run_dir.rglob("*.log"), st.run_dir / "stack.json", REPO / "deployments"]:
        for f in [path] if path.is_file() else sorted(path.glob("*.yaml")):
            written[str(f)] = f.read_text(errors="replace")
    config = st.run_dir / "mlflow" / "basic_auth.ini"
    assert config.stat().st_mode & 0o777 == 0o600
    written[str(config)] = config.read_text()
    assert len(written) > 5, written.keys()
    for where, text in written.items():
        for secret in hidden:
            assert secret not in text, f"a password in {where}"


def test_listen_beyond_loopback_needs_auth(tmp_path: Path) -> None:
    """`stack up --listen` on another address without credentials: one error naming the
    variables, nothing started (no request leaves this machine: it stops before any)."""
    env = _clean_env() | {"AWS_ACCESS_KEY_ID": "k" * 12, "AWS_SECRET_ACCESS_KEY": "s" * 16}
    run_dir = tmp_path / "stack"
    res = _cli("stack", "up", "--listen", "10.20.30.40", "--run-dir", str(run_dir), env=env)
    said = res.stdout + res.stderr
    assert res.returncode != 0, said
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said
    assert "--listen 10.20.30.40" in said, said
    assert "PREFECT_API_AUTH_STRING" in said, said
    assert "nothing was started" in said
    assert "Traceback" not in said
    assert not run_dir.exists()
    res = _cli("stack", "up", "--listen", "0.0.0.0", "--run-dir", str(run_dir), env=env)
    assert res.returncode != 0
    assert "every-interface" in res.stdout + res.stderr
    assert not run_dir.exists()
    # some of them only: the error names the missing ones
    partial = env | {"PREFECT_API_AUTH_STRING": "agegender:" + "p" * 16}
    res = _cli("stack", "up", "--listen", "10.20.30.40", "--run-dir", str(run_dir), env=partial)
    said = res.stdout + res.stderr
    assert res.returncode != 0, said
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in said, said
    assert not run_dir.exists()


def test_env_for_worker(tmp_path: Path) -> None:
    """`stack env --for-worker`: the URLs on the listen address, the heartbeat, Prefect's auth
    string and the worker user's MLflow login; nothing of S3, no admin or reader password. A
    stack on loopback only has nothing to offer another machine."""
    values = _secrets()
    listen = Stack(tmp_path / "net", ports=Ports.shifted(7), host="10.20.30.40", auth=True)
    listen.save_state({})  # the state `stack up --listen 10.20.30.40` leaves (no server needed)
    env = _clean_env() | values
    res = _cli("stack", "env", "--for-worker", "--run-dir", str(listen.run_dir), env=env)
    assert res.returncode == 0, res.stderr
    lines = dict(
        line.removeprefix("export ").split("=", 1) for line in res.stdout.strip().splitlines()
    )
    assert lines["PREFECT_API_URL"] == "http://10.20.30.40:4207/api"
    assert lines["MLFLOW_TRACKING_URI"] == "http://10.20.30.40:5007"
    assert lines["PREFECT_API_AUTH_STRING"] == values["PREFECT_API_AUTH_STRING"]
    assert lines["MLFLOW_TRACKING_USERNAME"] == "worker"
    assert lines["MLFLOW_TRACKING_PASSWORD"] == values["AGEGENDER_MLFLOW_WORKER_PASSWORD"]
    assert lines["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"].isdigit()
    assert lines["DO_NOT_TRACK"] == "true"  # a worker machine is as offline as this one
    assert lines["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"  # artifacts via MLflow
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert values[key] not in res.stdout
        assert key not in res.stdout
    assert values["AGEGENDER_MLFLOW_READER_PASSWORD"] not in res.stdout
    local = Stack(tmp_path / "local", ports=Ports.shifted(7))
    local.save_state({})
    res = _cli("stack", "env", "--for-worker", "--run-dir", str(local.run_dir), env=env)
    assert res.returncode != 0
    assert "--listen" in res.stdout + res.stderr


def test_auth_settings_name_what_is_missing(tmp_path: Path) -> None:
    """Credentials from the environment, else `.env`; never a default password."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "PREFECT_API_AUTH_STRING=agegender:from-the-file\n"
        "export MLFLOW_AUTH_ADMIN_PASSWORD='admin-password-1'\n"
        "AGEGENDER_MLFLOW_WORKER_PASSWORD=short\n"
    )
    saved = {k: os.environ.pop(k, None) for k in AUTH_VARS}
    try:
        with pytest.raises(StackError) as info:
            auth_settings(env_file)
        said = str(info.value)
        assert "AGEGENDER_MLFLOW_READER_PASSWORD is not set" in said
        assert "AGEGENDER_MLFLOW_WORKER_PASSWORD is shorter than 12" in said
        assert "PREFECT_API_AUTH_STRING" not in said.split("(")[0]
        os.environ["AGEGENDER_MLFLOW_WORKER_PASSWORD"] = "worker-password-1"
        os.environ["AGEGENDER_MLFLOW_READER_PASSWORD"] = "reader-password-1"
        auth = auth_settings(env_file)
        assert auth == Auth(
            "agegender:from-the-file",
            ("admin", "admin-password-1"),
            ("worker", "worker-password-1"),
            ("reader", "reader-password-1"),
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_short_prefect_password_is_refused_naming_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's auth string needs a password of 12 characters, as MLflow's users do: shorter
    is one error naming the variable and where it was set (.env, else the environment)."""
    for key in AUTH_VARS:
        monkeypatch.delenv(key, raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text(
        "PREFECT_API_AUTH_STRING=agegender:short\n"
        + "".join(f"{k}={k.lower()}-{'x' * 12}\n" for k in AUTH_VARS[1:4])
    )
    said = []
    for where in (str(env_file), "the environment"):
        with pytest.raises(StackError) as info:
            auth_settings(env_file)
        said.append(str(info.value))
        assert said[-1] == (
            "authentication: PREFECT_API_AUTH_STRING's password is shorter than 12 characters "
            f"(set in {where}) (set them in the environment or in {env_file}; see .env.example)"
        )
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", "agegender:" + "p" * 11)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "agegender:" + "p" * 12)
    assert auth_settings(env_file).prefect == "agegender:" + "p" * 12


def test_a_dotenv_open_to_other_users_is_made_private_with_one_note(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cp .env.example .env` leaves `.env` 0644, readable by any local user: the first command
    that reads it makes it 0600 and says so in one line; `nobody` read it before, not after."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    parent = Path(tempfile.mkdtemp(prefix="agegender-test-env-"))
    parent.chmod(0o711)  # others may pass through, as through any home folder
    env_file = parent / ".env"
    try:
        shutil.copy(REPO / ".env.example", env_file)
        env_file.chmod(0o644)  # what `cp` gives from a checkout's 0644 file
        assert opened_by_nobody([env_file]) == [str(env_file)]
        capfd.readouterr()
        assert credentials(env_file)["AWS_ACCESS_KEY_ID"] == "change-me"
        assert capfd.readouterr().err.splitlines() == [
            f"note: {env_file} was open to other users (mode 0644); made it private "
            f"(`chmod 600 {env_file}`)"
        ]
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert opened_by_nobody([env_file]) == []
        credentials(env_file)  # private now: read without a word
        assert capfd.readouterr().err == ""
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_s3_relay_passes_signed_requests_only(
    auth_stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    """The relay `stack up --listen` puts S3 behind (here on 127.0.0.2): anonymous and wrongly
    signed requests get SeaweedFS's 403 through it; signed ones, a multipart upload included,
    work, and its log holds no signature."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import ClientError

    st, values = auth_stack
    port = st.ports.s3
    log = tmp_path / "relay.log"
    cmd = [sys.executable, "-m", "deployments.relay", "s3", "127.0.0.2", str(port), "127.0.0.1"]
    with log.open("w") as out:
        relay = subprocess.Popen([*cmd, str(port), str(1 << 30)], cwd=REPO, stdout=out, stderr=out)
    url = f"http://127.0.0.2:{port}"
    try:
        for _ in range(300):  # up when it relays SeaweedFS's 403
            with contextlib.suppress(OSError):
                if _status(f"{url}/") == 403:
                    break
            assert relay.poll() is None, log.read_text()
            time.sleep(0.2)
        assert _status(f"{url}/{st.bucket}/") == 403

        def client(secret: str) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id=values["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=secret,
                config=Config(retries={"max_attempts": 1}),
            )

        with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
            client("not-the-secret-key").list_buckets()
        s3 = client(values["AWS_SECRET_ACCESS_KEY"])
        assert st.bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 << 20))
        small_parts = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
        s3.upload_file(str(big), st.bucket, "relay/big.bin", Config=small_parts)
        got = s3.get_object(Bucket=st.bucket, Key="relay/big.bin")["Body"].read()
        assert got == big.read_bytes()
        s3.delete_object(Bucket=st.bucket, Key="relay/big.bin")
    finally:
        relay.terminate()
        relay.wait(30)
    text = log.read_text()
    assert "PUT /mlflow/relay/big.bin" in text, text[-2000:]
    assert "Signature" not in text
    assert "Credential" not in text
