"""The compose stack for real, in a real Docker engine (Debian's docker.io, on a private socket;
tests/containers.py): images built from our Dockerfiles unchanged (the worker as its CPU
variant), stand-ins for the third-party images (docker/standins/), every service healthy with
auth on, a suite whose fold runs as a flow-run container started by the compose worker, logging
to the compose MLflow (PostgreSQL + S3), and a fold killed mid-way (its flow-run container, or
the container and the worker: a lost machine, which only the heartbeat automation can mark
CRASHED) that the suite's retry resumes from its checkpoint.

CI has no GPU: the fold runs from `train-fold-cpu`, train-fold-gpu's deployment with the device
request left out and `device: cpu` (made here, never in prefect.yaml). Everything the test
reads comes back through the servers' APIs, as a user would read it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from agegender.labels import GENDERS
from agegender.synth.adience import write_synthetic
from deployments.prefect_api import PrefectApi
from deployments.provision import deploy_env, prefect_cli
from deployments.s3 import list_objects
from deployments.services import basic_auth
from tests import containers
from tests.conftest import REPO, TINY_ARGS
from tests.test_docker import DOORS, ENV_EXAMPLE, SECRETS, _compose_binary, _read_env, _tool_env
from tests.test_netns import _send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

PORTS = {"PREFECT_PORT": "14200", "MLFLOW_PORT": "15000", "S3_PORT": "18333", "SERVE_PORT": "15001"}
HEARTBEAT_S = 30  # Prefect's minimum: CRASHED after 90 s without one
ARTIFACTS = REPO / "runs" / "test-artifacts"
SUBNET = "198.19.10.0/24"  # compose's network (the engine's pool holds the rest)
# CI's machine has no GPU and no NVIDIA runtime (the engine refuses the device request): the
# worker service without its reservation, and compose's network in our range.
OVERRIDE = f"""\
services:
  worker:
    deploy: !reset {{}}
networks:
  default:
    ipam:
      config:
        - subnet: {SUBNET}
"""
SUITE = [
    "suite.variants=[multitask]",
    "suite.folds=[0]",
    "suite.mode=deployments",
    "suite.deployment=train_fold/train-fold-cpu",
    "suite.image_size=56",
    *TINY_ARGS,
]


@dataclass
class ComposeStack:
    engine: containers.Engine
    env_file: Path
    override: Path
    values: dict[str, str]
    data: Path

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{PORTS['PREFECT_PORT']}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{PORTS['S3_PORT']}"

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=REPO,
        )

    def argv(self, *args: str) -> list[str]:
        files = ["-f", str(REPO / "docker/compose.yaml"), "-f", str(self.override)]
        return [str(_compose_binary()), *files, "--env-file", str(self.env_file), *args]

    def env(self) -> dict[str, str]:
        return _tool_env(self.env_file.parent) | self.engine.env()

    def prefect(self, method: str, path: str, body: Any = None) -> Any:
        return PrefectApi(self.prefect_api, self.values["PREFECT_API_AUTH_STRING"])(
            method, path, body
        )

    def mlflow_env(self, user: str = "worker") -> dict[str, str]:
        password = self.values[f"AGEGENDER_MLFLOW_{user.upper()}_PASSWORD"]
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }

    def runs_volume(self) -> Path:
        volume = self.engine.client().volumes.get("agegender_runs")
        return Path(volume.attrs["Mountpoint"])

    def flow_runs(self, suite: str, name: str = "multitask-fold0") -> list[dict[str, Any]]:
        """The fold's flow runs in one suite (its tag), oldest first."""
        body = {"flow_runs": {"name": {"any_": [name]}, "tags": {"all_": [f"suite:{suite}"]}}}
        runs = self.prefect("POST", "/flow_runs/filter", body)
        return sorted(runs, key=lambda r: r["expected_start_time"])

    def logs(self, flow_run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
        return "\n".join(r["message"] for r in self.prefect("POST", "/logs/filter", body))

    def suite(self, *args: str) -> subprocess.Popen[str]:
        """`agegender suite` in a container of the worker service (compose's network, /data and
        the runs volume, the worker's credentials): the folds' paths mean the same there."""
        argv = self.argv(
            "run",
            "--rm",
            "--no-deps",
            "-T",
            "worker",
            "agegender",
            "suite",
            "--data-root",
            "/data/adience",
            "--run-root",
            "/runs/suite",
            *args,
        )
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env(),
            cwd=REPO,
        )


@pytest.fixture(scope="module")
def engine() -> Iterator[containers.Engine]:
    with containers.engine() as e:
        yield e


@pytest.fixture(scope="module")
def images(engine: containers.Engine) -> dict[str, Any]:
    """Every image built; seconds and sizes left in runs/test-artifacts/containers.json (a
    cached layer makes a rebuild take a second)."""
    took = containers.build_all(engine.client(), ARTIFACTS / "container-builds")
    client = engine.client()
    built = {t: {"s": round(s), "GB": round(client.images.get(t).attrs["Size"] / 1e9, 2)}
             for t, s in took.items()}  # fmt: skip
    _record("images", built)
    return built


def _record(key: str, value: Any) -> None:
    path = ARTIFACTS / "containers.json"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | {key: value}, indent=1))


def _values(engine: containers.Engine, data: Path) -> dict[str, str]:
    values = {k: v for k, v in _read_env(ENV_EXAMPLE).items() if v != "change-me"}
    values |= {name: secrets.token_hex(16) for name in SECRETS}
    values["PREFECT_API_AUTH_STRING"] = f"agegender:{secrets.token_hex(16)}"  # user:password
    values["AGEGENDER_SERVE_AUTH"] = f"serve:{secrets.token_hex(16)}"
    values |= PORTS | {
        "DATA_DIR": str(data),
        "DOCKER_SOCKET": str(engine.sock),
        "DOCKER_GID": str(engine.sock.stat().st_gid),
        "HEARTBEAT_S": str(HEARTBEAT_S),
    }
    return values


@pytest.fixture(scope="module")
def compose_stack(engine: containers.Engine, images: dict[str, Any]) -> Iterator[ComposeStack]:
    # under the engine's root, world-readable: the containers' user (uid 10001) reads the data
    root = containers.ENGINE_ROOT / f"stack-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    write_synthetic(data / "adience", size=72, per_fold=120, seed=5, workers=1)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    values = _values(engine, data)
    env_file = root / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    override = root / "compose.override.yaml"
    override.write_text(OVERRIDE)
    st = ComposeStack(engine, env_file, override, values, data)
    t0 = time.monotonic()
    up = st.compose("up", "-d", "--no-build", "--pull", "never", "--wait", "--wait-timeout", "600")
    try:
        assert up.returncode == 0, up.stdout + up.stderr + _logs(st)
        _record("compose_up_s", round(time.monotonic() - t0))
        _deploy_cpu_variant(st)
        yield st
    finally:
        st.compose("--profile", "serve", "down", "-v", "--remove-orphans", "--timeout", "20")
        shutil.rmtree(root, ignore_errors=True)


def _logs(st: ComposeStack) -> str:
    res = st.compose("logs", "--no-color", "--tail", "40")
    return "\n" + res.stdout[-8000:]


def _deploy_cpu_variant(st: ComposeStack) -> None:
    """train-fold-gpu as prefect.yaml has it, less the GPU request, on the CPU; deployed from
    this checkout as docker/README.md says (prefect-docker installed, the stack's URL)."""
    spec = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())
    (gpu,) = [d for d in spec["deployments"] if d["name"] == "train-fold-gpu"]
    cpu = json.loads(json.dumps(gpu))
    cpu["name"] = "train-fold-cpu"
    cpu["parameters"]["device"] = "cpu"
    del cpu["work_pool"]["job_variables"]["container_create_kwargs"]["device_requests"]
    path = st.env_file.parent / "prefect.yaml"
    path.write_text(
        yaml.safe_dump(
            {k: v for k, v in spec.items() if k != "deployments"}
            | {"definitions": {}, "deployments": [cpu]}
        )
    )
    env = deploy_env(dict(os.environ) | {
        "PREFECT_API_URL": st.prefect_api,
        "PREFECT_API_AUTH_STRING": st.values["PREFECT_API_AUTH_STRING"],
        "AGEGENDER_JOB_DATA_DIR": str(st.data),
        "MLFLOW_TRACKING_USERNAME": "worker",
        "MLFLOW_TRACKING_PASSWORD": st.values["AGEGENDER_MLFLOW_WORKER_PASSWORD"],
        "AGEGENDER_HOME": str(REPO),
        "PREFECT_HOME": str(st.env_file.parent / "prefect-home"),
    })  # fmt: skip
    prefect_cli(
        ["--no-prompt", "deploy", "--prefect-file", str(path), "--name", "train-fold-cpu"], env
    )


def test_every_service_is_healthy_and_asks_who_calls(compose_stack: ComposeStack) -> None:
    res = compose_stack.compose("ps", "-a", "--format", "json")
    assert res.returncode == 0, res.stderr
    services = {s["Service"]: s for s in map(json.loads, res.stdout.splitlines())}
    one_shot = {"s3-init", "mlflow-users", "prefect-init"}
    servers = {"postgres", "s3", "prefect-server", "mlflow", "worker"}
    assert set(services) == servers | one_shot | set(DOORS)
    for name, s in services.items():
        if name in one_shot:
            assert (s["State"], s["ExitCode"]) == ("exited", 0), s
        else:
            assert (s["State"], s["Health"]) == ("running", "healthy"), s
    for url in (
        f"{compose_stack.prefect_api}/flows/filter",
        f"{compose_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(url, data=b"{}" if "prefect" in url else None), timeout=10
            )
        assert refused.value.code == 401, url
    with pytest.raises(Exception, match=r"AccessDenied|403|InvalidAccessKeyId"):
        list_objects(
            compose_stack.s3_url,
            {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x"},
            "mlflow",
        )
    # Issue 26: the published ports are the front doors': a body over the limit or without
    # credentials is refused at once (only the head is sent; a server would wait for the body)
    st = compose_stack
    search = "POST /api/2.0/mlflow/experiments/search HTTP/1.1\r\nContent-Type: application/json"
    flows = "POST /api/flows/filter HTTP/1.1\r\nContent-Type: application/json"
    over = f"Content-Length: {1 << 30}"
    mlflow_login = basic_auth(f"worker:{st.values['AGEGENDER_MLFLOW_WORKER_PASSWORD']}")
    prefect_login = basic_auth(st.values["PREFECT_API_AUTH_STRING"])
    assert _send(st.mlflow_url, f"{search}\r\nContent-Length: {256 << 20}")[0] == 401
    assert _send(st.mlflow_url, f"{search}\r\n{over}")[0] in (401, 413)
    assert _send(st.prefect_api, f"{flows}\r\n{over}")[0] in (401, 413)
    login = f"Authorization: {mlflow_login['Authorization']}"
    assert _send(st.mlflow_url, f"{search}\r\n{login}\r\n{over}")[0] == 413
    login = f"Authorization: {prefect_login['Authorization']}"
    assert _send(st.prefect_api, f"{flows}\r\n{login}\r\n{over}")[0] == 413
    assert _send(st.s3_url, f"PUT /mlflow/big HTTP/1.1\r\nContent-Length: {6 << 30}")[0] == 413
    # made by compose itself (prefect-init): the pool, the GPU deployment, crash detection
    pools = {p["name"]: p["type"] for p in compose_stack.prefect("POST", "/work_pools/filter", {})}
    assert pools["gpu"] == "docker"
    automations = compose_stack.prefect("POST", "/automations/filter", {})
    (crash,) = [a for a in automations if "heartbeats stopped" in a["name"]]
    assert float(crash["trigger"]["within"]) == 3 * HEARTBEAT_S
    (dep,) = compose_stack.prefect(
        "POST", "/deployments/filter", {"deployments": {"name": {"any_": ["train-fold-gpu"]}}}
    )
    jobs = dep["job_variables"]
    assert jobs["networks"] == ["agegender_default"]
    assert jobs["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert jobs["volumes"][0] == f"{compose_stack.data}:/data:ro"
    assert jobs["auto_remove"] is True


def test_container_networks_use_the_test_range(compose_stack: ComposeStack) -> None:
    allowed = ipaddress.ip_network("198.18.0.0/15")
    nets = compose_stack.engine.client().networks.list()
    subnets = {
        n.name: [c["Subnet"] for c in (n.attrs.get("IPAM") or {}).get("Config") or []] for n in nets
    }
    assert "agegender_default" in subnets
    assert subnets["agegender_default"] == [SUBNET]
    for name, nets_ in subnets.items():
        for subnet in nets_:
            assert ipaddress.ip_network(subnet).subnet_of(allowed), (name, subnet)  # type: ignore[arg-type]


def test_a_suite_runs_its_fold_in_a_flow_run_container(compose_stack: ComposeStack) -> None:
    from mlflow.tracking import MlflowClient

    proc = compose_stack.suite("suite.name=containers", "train.iterations=30", *SUITE)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-4000:] + _logs(compose_stack)
    (run,) = compose_stack.flow_runs("containers")
    assert run["state_type"] == "COMPLETED"
    # started by the docker worker: its infrastructure is a container of the worker image
    assert run["infrastructure_pid"], run
    assert "training on cpu" in compose_stack.logs(run["id"])
    # auto_remove: no flow-run container is left behind
    left = compose_stack.engine.client().containers.list(
        all=True, filters={"label": "io.prefect.flow-run-id"}
    )
    assert left == []
    exp, fold = _fold_run(compose_stack, "containers")
    with mock.patch.dict(os.environ, compose_stack.mlflow_env("reader")):
        client = MlflowClient()
        champion = client.get_model_version_by_alias("agegender-multitask", "champion")
        assert champion.tags["fold_run_id"] == fold.info.run_id  # registered from this fold
    s3 = {"AWS_ACCESS_KEY_ID": compose_stack.values["AWS_ACCESS_KEY_ID"],
          "AWS_SECRET_ACCESS_KEY": compose_stack.values["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    keys = list_objects(compose_stack.s3_url, s3, "mlflow", "artifacts/")
    for name in ("best.pt", "result.json"):
        tail = f"/{exp.experiment_id}/{fold.info.run_id}/artifacts/{name}"
        assert any(k.endswith(tail) for k in keys), (tail, keys[:20])


def test_the_serve_profile_answers_with_the_champion(compose_stack: ComposeStack) -> None:
    """Issue 29 item 8: `--profile serve` starts the serving image on the champion the suite
    above registered, read from the compose MLflow as its reader; healthy once /ping answers (a
    warm-up prediction ran); from the host it refuses a request without credentials (401) and
    answers one with them in MLflow's format, saying which model version it serves."""
    from mlflow.tracking import MlflowClient

    st = compose_stack
    with mock.patch.dict(os.environ, st.mlflow_env("reader")):
        champion = MlflowClient().get_model_version_by_alias("agegender-multitask", "champion")
    t0 = time.monotonic()
    up = st.compose("--profile", "serve", "up", "-d", "--no-build", "--pull", "never", "--wait",
                    "--wait-timeout", "600", "serve")  # fmt: skip
    serve_logs = st.compose("--profile", "serve", "logs", "--no-color", "--tail", "40", "serve")
    assert up.returncode == 0, up.stdout + up.stderr + serve_logs.stdout
    _record("serve_up_s", round(time.monotonic() - t0))
    try:
        url = f"http://127.0.0.1:{PORTS['SERVE_PORT']}"
        photo = next(st.data.glob("adience/aligned/*/*.jpg")).read_bytes()
        body = json.dumps(
            {"dataframe_records": [{"image": base64.b64encode(photo).decode(), "detect": False}]}
        ).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(f"{url}/invocations", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 401
        login = basic_auth(st.values["AGEGENDER_SERVE_AUTH"])
        request = urllib.request.Request(f"{url}/invocations", data=body, headers=headers | login)
        with urllib.request.urlopen(request, timeout=300) as r:
            (row,) = json.load(r)["predictions"]
        assert (row["image"], row["status"], row["error"]) == (0, "whole image", None), row
        assert row["age"] in row["age_probs"], row
        assert row["gender"] in GENDERS, row
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/model", headers=login), timeout=60
        ) as r:
            served = json.load(r)
        assert (served["name"], str(served["version"]), served["run_id"]) == (
            "agegender-multitask",
            champion.version,
            champion.run_id,
        ), served
    finally:
        st.compose("--profile", "serve", "rm", "--stop", "--force", "serve")


# Who marks the killed fold CRASHED: with its worker alive, the worker, from the container's exit
# status 137 -- or, when auto_remove took the container before the worker read that status (it
# then reads 0), the heartbeat automation; with the worker dead too, only the automation.
CRASHED_BY = {
    "container": r"non-zero status code 137|no heartbeat for 90 s",
    "machine": r"no heartbeat for 90 s",
}


@pytest.mark.parametrize("lost", ["container", "machine"])
def test_a_killed_fold_is_crashed_and_resumed_from_its_checkpoint(
    compose_stack: ComposeStack, lost: str
) -> None:
    """`kill` of the flow-run container mid-fold (`container`), or of it and the compose worker
    at once (`machine`: the host is lost): the run ends CRASHED, the suite's retry starts a new
    flow run (the worker back, for `machine`) that resumes from the checkpoint in /runs."""
    client = compose_stack.engine.client()
    suite = f"containers-kill-{lost}"
    proc = compose_stack.suite(f"suite.name={suite}", "train.iterations=150", *SUITE)
    try:
        volume = compose_stack.runs_volume()
        deadline = time.monotonic() + 600
        checkpoints: list[Path] = []
        while time.monotonic() < deadline and not checkpoints:
            if proc.poll() is not None:
                pytest.fail((proc.stdout.read() if proc.stdout else "") + _logs(compose_stack))
            checkpoints = list(volume.glob(f"suite/{suite}/multitask/fold0-*/last.pt"))
            time.sleep(0.5)
        assert checkpoints, "no checkpoint was written" + _logs(compose_stack)
        (first,) = compose_stack.flow_runs(suite)
        fold = client.containers.list(filters={"label": f"io.prefect.flow-run-id={first['id']}"})
        assert len(fold) == 1, "the fold's container was not found"
        killed = fold
        if lost == "machine":  # the worker first: alive, it would report the fold's exit itself
            service = ["com.docker.compose.service=worker", "com.docker.compose.oneoff=False"]
            killed = client.containers.list(filters={"label": service}) + fold
            assert len(killed) == 2
        for c in killed:
            c.kill()
        assert not (checkpoints[0].parent / "result.json").exists()
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            state = compose_stack.prefect("GET", f"/flow_runs/{first['id']}")
            if state["state_type"] == "CRASHED":
                break
            time.sleep(2)
        assert state["state_type"] == "CRASHED", state["state"]
        assert re.search(CRASHED_BY[lost], state["state"]["message"]), state["state"]
        up = compose_stack.compose("up", "-d", "--no-build", "--pull", "never", "--wait", "worker")
        assert up.returncode == 0, up.stderr
        out, _ = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 0, out[-4000:] + _logs(compose_stack)
    runs = compose_stack.flow_runs(suite)
    assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"]
    assert "resuming from its checkpoint" in compose_stack.logs(runs[1]["id"])
    _fold_run(compose_stack, suite)  # one FINISHED run, no epoch twice


def test_down_removes_every_container_and_network(compose_stack: ComposeStack) -> None:
    down = compose_stack.compose("down", "-v", "--remove-orphans", "--timeout", "20")
    assert down.returncode == 0, down.stderr
    client = compose_stack.engine.client()
    assert client.containers.list(all=True) == []
    assert "agegender_default" not in {n.name for n in client.networks.list()}


def _fold_run(st: ComposeStack, suite: str) -> tuple[Any, Any]:
    """The suite's experiment and its one fold run, read as the MLflow reader: FINISHED, with
    one val_loss per epoch (none lost, none twice)."""
    from mlflow.tracking import MlflowClient

    with mock.patch.dict(os.environ, st.mlflow_env("reader")):
        client = MlflowClient()
        exp = client.get_experiment_by_name(suite)
        assert exp is not None
        (fold,) = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
        history = client.get_metric_history(fold.info.run_id, "val_loss")
    assert fold.info.status == "FINISHED"
    assert fold.data.tags["fold"] == "0"
    assert history
    assert [m.step for m in history] == list(range(1, len(history) + 1))
    return exp, fold
