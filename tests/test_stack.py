"""The service stack for real: S3 (SeaweedFS), MLflow server, Prefect server and worker, all
started by `deployments.stack`, then driven as a user would (deployments, CLI, REST, boto3)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from deployments.automations import NAME as ZOMBIES
from deployments.layout import Ports
from deployments.s3 import ensure_bucket
from deployments.services import GPU_LIMIT, StackError
from deployments.stack import Stack
from deployments.supervisor import alive, tail
from tests.conftest import (
    REPO,
    STACK_SUITE,
    TINY_ARGS,
    client_env,
    flow_runs,
    opened_by_nobody,
    prefect_api,
    prefect_post,
    processes_of,
    scale_out_params,
    suite_cli,
)

pytestmark = pytest.mark.integration

# Run in a separate process: what any client sees through the REST API (no MLflow library).
REST_CHECK = """
import json, sys, urllib.request
base, name = sys.argv[1], sys.argv[2]
def call(path, body=None):
    req = urllib.request.Request(base + "/api/2.0/mlflow/" + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    return json.loads(urllib.request.urlopen(req, timeout=30).read())
exp = call("experiments/get-by-name?experiment_name=" + name)["experiment"]["experiment_id"]
def runs(query):
    body = {"experiment_ids": [exp], "filter": query, "max_results": 1000}
    return call("runs/search", body).get("runs", [])
done = " and attributes.status = 'FINISHED'"
out = {k: [r["info"]["run_id"] for r in runs(f"tags.kind = '{k}'" + done)]
       for k in ("parent", "fold", "pretrain", "summary")}
out["experiment_id"] = exp
print(json.dumps(out))
"""

S3_CHECK = """
import json, sys, boto3
url, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in p.get("Contents", [])]
print(json.dumps(keys))
"""


def _python(script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    res = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _no_aws(env: dict[str, str] | None = None) -> dict[str, str]:
    return {k: v for k, v in (env or dict(os.environ)).items() if not k.startswith("AWS_")}


def test_suite_deployment_is_tracked_in_mlflow_with_artifacts_in_s3(
    stack: Any, stack_suite: dict[str, Any], stack_creds: dict[str, str]
) -> None:
    found = _python(REST_CHECK, stack.mlflow_url, STACK_SUITE, env=_no_aws())
    assert len(found["parent"]) == 4
    assert len(found["fold"]) == 20
    assert len(found["pretrain"]) == 1
    assert len(found["summary"]) == 1
    assert sorted(found["parent"]) == sorted(stack_suite["parents"].values())

    keys = set(_python(S3_CHECK, stack.s3_url, stack.bucket, env=_no_aws() | stack_creds))
    exp = found["experiment_id"]
    for run_id in found["fold"]:
        for name in ("best.pt", "result.json", "learning_curves.png", "test_predictions.csv"):
            assert f"artifacts/{exp}/{run_id}/artifacts/{name}" in keys, (run_id, name)
    for run_id in found["parent"]:
        assert f"artifacts/{exp}/{run_id}/artifacts/fold_bars.png" in keys
    (pre,) = found["pretrain"]
    assert f"artifacts/{exp}/{pre}/artifacts/checkpoint/best.pt" in keys
    # the registered backbone points at that run
    client = MlflowClient(stack.mlflow_url)
    versions = client.search_model_versions("name = 'agegender-pretrained-celeba'")
    assert pre in {v.run_id for v in versions}


def test_stack_status_shows_servers_pools_workers_and_runs(
    stack: Any, stack_suite: dict[str, Any]
) -> None:
    res = _status(stack, "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert {n: s["healthy"] for n, s in status["services"].items()} == dict.fromkeys(
        stack.services, True
    )
    assert status["db"] == stack.db
    assert status["services"]["mlflow"]["url"] == stack.mlflow_url  # its own ports, remembered
    assert status["pools"]["local"]["type"] == "process"
    assert status["pools"]["gpu"]["type"] == "docker"
    assert len(status["workers"]["local"]) >= 1
    assert {"suite", "cross-validate", "train-fold", "train-fold-gpu"} <= set(status["deployments"])
    assert status["last_runs"]


def _client(stack: Any, program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A venv program (`agegender`, `prefect`) run as a client of the stack."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(program)), *args],
        capture_output=True,
        text=True,
        env=client_env(stack),
        timeout=120,
    )


def _status(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return _client(stack, "agegender", "stack", "status", *args, "--run-dir", str(stack.run_dir))


def _automations(stack: Any) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        f"{stack.prefect_api}/automations/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return [a for a in json.loads(r.read()) if a["name"] == ZOMBIES]


def test_schedules_start_paused_until_resumed_and_status_checks_their_paths(stack: Any) -> None:
    with urllib.request.urlopen(f"{stack.prefect_api}/deployments/name/suite/suite") as r:
        deployment = json.loads(r.read())
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * 1"
    assert schedule["active"] is False  # the /data paths may not exist: nothing runs by itself
    assert deployment["work_pool_name"] == "local"
    body = {
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
    }
    assert flow_runs(stack, body) == []

    res = _status(stack, "--json")
    assert res.returncode == 0, res.stderr
    (shown,) = [s for s in json.loads(res.stdout)["schedules"] if s["deployment"] == "suite/suite"]
    assert shown["active"] is False
    assert shown["schedule_id"] == schedule["id"]
    assert datetime.fromisoformat(shown["next_run"]).weekday() == 0  # a Monday
    checks = {c["name"]: c["ok"] for c in shown["parameters"]}
    assert checks["data_root"] is Path("/data/adience").is_dir()
    assert checks["suite.pretrain.root"] is Path("/data/celeba").is_dir()
    assert shown["resolves"] is all(checks.values())
    text = _status(stack)
    assert text.returncode == 0, text.stderr
    assert "schedule suite/suite cron '0 3 * * 1' UTC: paused, next 20" in text.stdout
    assert f"prefect deployment schedule resume suite/suite {schedule['id']}" in text.stdout
    assert "crash detection: runs without a heartbeat for 90 s are marked CRASHED" in text.stdout

    # turned on as the status line says, it gets its scheduled runs
    resume = _client(
        stack, "prefect", "deployment", "schedule", "resume", "suite/suite", schedule["id"]
    )
    assert resume.returncode == 0, resume.stdout + resume.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not flow_runs(stack, body):
        time.sleep(2)
    scheduled = flow_runs(stack, body)
    assert scheduled, "no run was scheduled after the schedule was resumed"
    assert all(run["expected_start_time"] for run in scheduled)

    # a second `stack up` (setup again) keeps the user's choice and one crash automation
    assert len(_automations(stack)) == 1
    stack.setup()
    with urllib.request.urlopen(f"{stack.prefect_api}/deployments/name/suite/suite") as r:
        (again,) = json.loads(r.read())["schedules"]
    assert again["active"] is True
    assert len(_automations(stack)) == 1
    # and so does the command for other servers (its clients' heartbeat period: 30 s here)
    res = _client(stack, "agegender", "stack", "crash-detection")
    assert res.returncode == 0, res.stderr
    said = f"{stack.prefect_api}: automation '{ZOMBIES}' unchanged (CRASHED after 90 s"
    assert said in res.stdout
    assert len(_automations(stack)) == 1
    pause = _client(stack, "prefect", "deployment", "schedule", "pause", "suite/suite", again["id"])
    assert pause.returncode == 0, pause.stdout + pause.stderr

    with urllib.request.urlopen(
        f"{stack.prefect_api}/deployments/name/train_fold/train-fold-gpu"
    ) as r:
        gpu = json.loads(r.read())
    assert gpu["work_pool_name"] == "gpu"
    requests = gpu["job_variables"]["container_create_kwargs"]["device_requests"]
    assert requests == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]


def _container_kwargs(stack: Any, template: dict[str, Any], variables: dict[str, Any]) -> Any:
    """What prefect-docker's worker passes to docker-py's `containers.create` for a flow run
    of a deployment with these job variables on a pool with this template (the worker's own
    code; no Docker engine is needed to build the arguments)."""
    import asyncio

    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    with prefect_api(stack):
        config = asyncio.run(
            DockerWorkerJobConfiguration.from_template_and_values(template, variables)
        )
    # the compose worker's own API URL, which Prefect adds to every job's env before this call
    config.env["PREFECT_API_URL"] = "http://prefect-server:4200/api"
    # docker-py (mypy would take the repository's docker/ folder for it)
    docker = importlib.import_module("docker")
    never_called = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.43")
    return DockerWorker(work_pool_name="gpu")._build_container_settings(never_called, config)


def _pool(stack: Any, name: str) -> Any:
    with urllib.request.urlopen(f"{stack.prefect_api}/work_pools/{name}") as r:
        return json.loads(r.read())


def _set_template(stack: Any, name: str, template: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{stack.prefect_api}/work_pools/{name}",
        data=json.dumps({"base_job_template": template}).encode(),
        headers={"Content-Type": "application/json"},
        method="PATCH",
    )
    urllib.request.urlopen(req, timeout=30).close()


def test_the_gpu_pool_gives_the_containers_their_gpus_and_is_never_overwritten(
    stack: Any,
) -> None:
    from tests.test_pools import bundled_docker_template

    pool = _pool(stack, "gpu")
    assert pool["type"] == "docker"
    with urllib.request.urlopen(
        f"{stack.prefect_api}/deployments/name/train_fold/train-fold-gpu"
    ) as r:
        variables = json.loads(r.read())["job_variables"]
    created = _container_kwargs(stack, pool["base_job_template"], variables)
    assert created["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]
    assert created["shm_size"] == "8g"
    assert created["network"] == "agegender_default"
    assert created["volumes"] == ["/data:/data:ro", "agegender_runs:/runs"]
    # the control: Prefect's bundled docker template (what the pool got before prefect-docker
    # was installed) drops both without a word
    dropped = _container_kwargs(stack, bundled_docker_template(), variables)
    assert "device_requests" not in dropped
    assert "shm_size" not in dropped

    original = pool["base_job_template"]
    mine = json.loads(json.dumps(original))
    mine["variables"]["properties"]["image"]["default"] = "registry.example/agegender:7"
    try:
        _set_template(stack, "gpu", mine)  # a user's own pool: set up again, it is kept
        said: list[str] = []
        stack.setup(progress=said.append)
        kept = _pool(stack, "gpu")["base_job_template"]
        assert kept["variables"]["properties"]["image"]["default"] == "registry.example/agegender:7"
        assert "work pool 'gpu' (docker) exists: kept as it is (checked: its template fits)" in said
        assert "work pool 'local' (process) exists: kept as it is (checked: its template fits)" in (
            said
        )
        # one that cannot carry the GPUs: an error naming the pool and the fix
        _set_template(stack, "gpu", bundled_docker_template())
        with pytest.raises(
            StackError,
            match=r"work pool 'gpu' has a base job template without container_create_kwargs.*"
            r"prefect work-pool update gpu --base-job-template",
        ):
            stack.setup(progress=said.append)
    finally:
        _set_template(stack, "gpu", original)


def test_the_servers_keep_their_data_in_postgresql(stack: Any, stack_suite: dict[str, Any]) -> None:
    if stack.db != "postgres":
        pytest.skip("the stack runs on SQLite (AGEGENDER_TEST_DB)")
    from deployments.postgres import ROLE as PG_ROLE
    from deployments.postgres import pg_bin

    password = (stack.run_dir / "postgres-password").read_text().strip()
    assert (stack.run_dir / "postgres-password").stat().st_mode & 0o777 == 0o600

    psql_at = [
        str(pg_bin() / "psql"),
        "-X",
        "-At",
        "-h",
        "127.0.0.1",
        "-p",
        str(stack.ports.postgres),
    ]

    def psql(database: str, sql: str) -> str:
        res = subprocess.run(
            [*psql_at, "-U", PG_ROLE, "-d", database, "-c", sql],
            capture_output=True,
            text=True,
            env=_no_aws() | {"PGPASSWORD": password},
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    experiment = stack_suite["experiment_id"]
    folds = psql(
        "mlflow",
        "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        f"WHERE r.experiment_id = {experiment} AND t.key = 'kind' AND t.value = 'fold'",
    )
    assert int(folds) >= 20
    run = psql(
        "prefect", f"SELECT state_type FROM flow_run WHERE id = '{stack_suite['flow_run_id']}'"
    )
    assert run == "COMPLETED"
    assert psql("prefect", "SELECT count(*) FROM work_pool WHERE name IN ('local', 'gpu')") == "2"
    assert psql("postgres", "SHOW listen_addresses") == "127.0.0.1"
    assert not list(stack.run_dir.rglob("*.db"))  # no SQLite store anywhere
    for log in (stack.run_dir / "logs").iterdir():
        assert password not in log.read_text(errors="replace"), log


def test_scale_out_runs_each_fold_as_a_flow_run_on_the_pool(
    stack: Any, learn_cache: Path, tmp_path: Path
) -> None:
    params = scale_out_params("stack-scale-out", learn_cache, tmp_path)
    with prefect_api(stack):
        run = run_deployment(
            "cross_validate/cross-validate", parameters=params, timeout=600, poll_interval=2
        )
    assert isinstance(run, FlowRun)
    assert run.state is not None
    assert run.state.is_completed(), run.state
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("stack-scale-out")
    assert exp is not None
    folds = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in folds)
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'parent'")
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent.info.run_id}
    body = {"flow_runs": {"name": {"any_": ["gender-fold0", "gender-fold1"]}}}
    fold_runs = flow_runs(stack, body)
    assert {r["state_type"] for r in fold_runs} == {"COMPLETED"}
    # the Prefect UI's filters find them by suite and variant (tags), the run by its name
    assert all({"suite:stack-scale-out", "variant:gender"} <= set(r["tags"]) for r in fold_runs)
    assert re.fullmatch(r"stack-scale-out-gender-\d{4}-\d\d-\d\d-\d{4}", run.name), run.name
    assert {"suite:stack-scale-out", "variant:gender"} <= set(run.tags), run.tags
    # process workers run the folds from the checkout that deployed them (a shared checkout)
    with urllib.request.urlopen(f"{stack.prefect_api}/deployments/name/train_fold/train-fold") as r:
        pull = json.loads(r.read())["pull_steps"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    # nothing ties a run to the host or process it ran in (crash detection needs neither)
    assert not [t for r in fold_runs for t in r["tags"] if t.startswith(("host:", "pid:"))]


def test_mlflow_restart_during_a_suite_loses_no_fold(
    stack: Any, stack_creds: dict[str, str], learn_cache: Path, tmp_path: Path
) -> None:
    proc = suite_cli(
        stack,
        learn_cache,
        tmp_path,
        "suite.name=stack-restart",
        "suite.variants=[age, gender]",
        "train.iterations=30",
        *TINY_ARGS,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(tmp_path.glob("*/*/fold*/result.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    stack.stop("mlflow")  # mid-suite: folds keep training, their logging waits and retries
    time.sleep(3)
    stack.start("mlflow", stack_creds)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("stack-restart")
    assert exp is not None
    folds = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
    assert sorted((r.data.tags["variant"], r.data.tags["fold"]) for r in folds) == sorted(
        (v, str(k)) for v in ("age", "gender") for k in range(5)
    )
    assert {r.info.status for r in folds} == {"FINISHED"}
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'parent'")
    assert all(p.data.tags["folds"] == "0, 1, 2, 3, 4" for p in parents)


def _worker_elsewhere(stack: Any, creds: dict[str, str]) -> subprocess.Popen[bytes]:
    """The stack's worker command under another host name (a UTS namespace, where we may make
    one): the suite cannot tell its folds' processes by host, as on a second machine."""
    argv, env = stack.command("worker", creds)
    other = ["unshare", "--uts", "sh", "-c", 'hostname worker-elsewhere && exec "$@"', "sh"]
    probe = subprocess.run([*other, "true"], capture_output=True, timeout=30)
    with stack.log("worker").open("ab") as log:
        return subprocess.Popen(
            [*other, *argv] if probe.returncode == 0 else argv,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _no_stray_suite_and_a_worker(
    stack: Any, creds: dict[str, str], proc: subprocess.Popen[str]
) -> None:
    """After a test that killed workers, whatever failed: the suite stopped, the stack's worker
    running again."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)
    worker = stack.supervisor.pids().get("worker")
    if worker is None or not alive(worker):
        stack.start("worker", creds)


def test_a_worker_killed_mid_fold_is_crashed_by_its_heartbeats_and_resumed(
    stack: Any, stack_creds: dict[str, str], learn_cache: Path, tmp_path: Path
) -> None:
    stack.stop("worker")
    elsewhere = _worker_elsewhere(stack, stack_creds)
    proc = suite_cli(
        stack,
        learn_cache,
        tmp_path,
        "suite.name=stack-kill",
        "suite.variants=[multitask]",
        "suite.folds=[0]",
        "suite.mode=deployments",
        "train.iterations=150",
        *TINY_ARGS,
    )
    body = {"flow_runs": {"name": {"any_": ["multitask-fold0"]}}}
    try:
        checkpoints: list[Path] = []
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not checkpoints:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert elsewhere.poll() is None, tail(stack.log("worker"))
            checkpoints = list(tmp_path.glob("stack-kill/multitask/fold0-*/last.pt"))
            time.sleep(0.2)
        assert checkpoints, "no checkpoint was written"
        (first,) = flow_runs(stack, body)
        fold = processes_of(first["id"])
        assert fold, "the fold's process was not found"
        # the worker and the fold it runs die at once, as with a lost machine
        os.killpg(elsewhere.pid, signal.SIGKILL)
        for pid in fold:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elsewhere.wait(timeout=60)
        assert not (checkpoints[0].parent / "result.json").exists()
        stack.start("worker", stack_creds)
        out, _ = proc.communicate(timeout=900)
    finally:  # whatever failed: no stray worker or suite, and the stack's worker back
        with contextlib.suppress(ProcessLookupError):
            os.killpg(elsewhere.pid, signal.SIGKILL)
        _no_stray_suite_and_a_worker(stack, stack_creds, proc)
    assert proc.returncode == 0, out[-3000:]
    log = stack.log("worker").read_text()
    assert "multitask fold 0: resuming from its checkpoint" in log
    runs = sorted(flow_runs(stack, body), key=lambda r: r["expected_start_time"])
    assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"]
    # marked by the server's automation, from the heartbeats alone
    assert "no heartbeat for 90 s" in runs[0]["state"]["message"]
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("stack-kill")
    assert exp is not None
    (fold_run,) = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
    assert fold_run.info.status == "FINISHED"
    history = client.get_metric_history(fold_run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1))  # no epoch lost


def _hold_slot(stack: Any) -> str:
    """This test takes the `gpu-slots` slot (as a fold would), so that folds queue behind it;
    the lease id, to give it back."""
    body = {"names": [GPU_LIMIT], "slots": 1, "mode": "concurrency", "lease_duration": 1800}
    deadline = time.monotonic() + 300  # an earlier test's fold may still hold it
    while True:
        try:
            return str(
                prefect_post(stack, "/v2/concurrency_limits/increment-with-lease", body)["lease_id"]
            )
        except urllib.error.HTTPError as exc:
            if exc.code != 423 or time.monotonic() > deadline:
                raise
        time.sleep(2)


def _give_back(stack: Any, lease: str) -> None:
    prefect_post(stack, "/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease})


def _heartbeats(stack: Any, flow_run_id: str) -> list[Any]:
    """The heartbeat events the server has of a flow run (the crash automation's clock)."""
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        },
        "limit": 1,
    }
    return list(prefect_post(stack, "/events/filter", body)["events"])


QUEUED = [
    "suite.name=stack-queued",
    "suite.variants=[gender]",
    "suite.folds=[0, 1]",
    "suite.mode=deployments",
    "suite.retries=0",  # no retry to spend: a fold that waited must not need one
    "train.iterations=8",
    *TINY_ARGS,
]
QUEUED_RUNS = {"flow_runs": {"name": {"any_": ["gender-fold0", "gender-fold1"]}}}


@pytest.fixture(scope="module")
def queued_folds_lost(
    stack: Any,
    stack_creds: dict[str, str],
    learn_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A suite in deployments mode whose two folds wait behind a slot (this test holds it),
    SIGKILLed with their worker before either starts (as when the worker's machine is lost);
    the worker started again and the slot given back, the server's automation crashes the two
    flow runs (their heartbeats stopped) and the suite goes on."""
    run_root = tmp_path_factory.mktemp("stack-queued")
    lease = _hold_slot(stack)
    proc = suite_cli(stack, learn_cache, run_root, *QUEUED)
    try:
        deadline = time.monotonic() + 400
        waiting: list[Any] = []
        while len(waiting) < 2:  # both running, waiting for the slot, their heartbeat sent
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, (waiting, tail(stack.log("worker")))
            runs = flow_runs(stack, QUEUED_RUNS)
            waiting = [
                r for r in runs if r["state_type"] == "RUNNING" and _heartbeats(stack, r["id"])
            ]
            time.sleep(1)
        folds = [pid for r in waiting for pid in processes_of(r["id"])]
        assert len(folds) >= 2, "the folds' processes were not found"
        worker = stack.supervisor.pids()["worker"]
        os.killpg(worker, signal.SIGKILL)
        for pid in folds:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while alive(worker):
            time.sleep(0.2)
        _give_back(stack, lease)
        stack.start("worker", stack_creds)
        out, _ = proc.communicate(timeout=900)
    finally:  # whatever failed: the slot given back, no stray suite, the stack's worker back
        _give_back(stack, lease)
        _no_stray_suite_and_a_worker(stack, stack_creds, proc)
    return {"returncode": proc.returncode, "out": out, "run_root": run_root}


def _queued_fold_runs(stack: Any) -> dict[str, list[Any]]:
    """run name -> its flow runs in order; of the stack-queued suite only."""
    runs = [r for r in flow_runs(stack, QUEUED_RUNS) if "suite:stack-queued" in r["tags"]]
    runs.sort(key=lambda r: r["expected_start_time"])
    return {n: [r for r in runs if r["name"] == n] for n in ("gender-fold0", "gender-fold1")}


def test_folds_lost_while_waiting_for_a_slot_spend_no_retry(
    stack: Any, queued_folds_lost: dict[str, Any]
) -> None:
    """With suite.retries=0, both folds still finish: their flow runs crashed before they
    started, which counts against suite.requeues, not the retries; none trained twice."""
    out = queued_folds_lost["out"]
    assert queued_folds_lost["returncode"] == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for name, runs in _queued_fold_runs(stack).items():
        assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"], (name, runs)
        assert "no heartbeat for 90 s" in runs[0]["state"]["message"]
        assert "fold:started" not in runs[0]["tags"]
        assert "fold:started" in runs[1]["tags"]
        assert runs[1]["state"]["message"].startswith("trained (MLflow run ")
        said = [line for line in out.splitlines() if f"({runs[0]['id']}) of " in line]
        assert len(said) == 1, out[-3000:]
        assert "before the fold started" in said[0]
        assert "not counted as a retry (1 of suite.requeues=3)" in said[0]
    assert "2 fold(s) trained, 0 already finished and skipped" in out
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("stack-queued")
    assert exp is not None
    folds = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]  # each trained once
    assert {r.info.status for r in folds} == {"FINISHED"}


def test_a_rerun_in_deployments_mode_counts_the_folds_it_skipped(
    stack: Any, learn_cache: Path, queued_folds_lost: dict[str, Any]
) -> None:
    """The same suite again: each fold's flow run finds its finished run and says so, and the
    suite counts both as skipped, as in-process mode does."""
    proc = suite_cli(stack, learn_cache, queued_folds_lost["run_root"], *QUEUED)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "0 fold(s) trained, 2 already finished and skipped" in out, out[-3000:]
    for name, runs in _queued_fold_runs(stack).items():
        assert runs[-1]["state_type"] == "COMPLETED", (name, runs)
        assert runs[-1]["state"]["message"].startswith("already finished (MLflow run "), runs
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("stack-queued")
    assert exp is not None
    assert len(client.search_runs([exp.experiment_id], "tags.kind = 'fold'")) == 2


def test_a_remote_folds_bad_input_is_one_error_line_and_not_retried(
    stack: Any, learn_cache: Path, tmp_path: Path
) -> None:
    """A GPU asked of the stack's worker (this machine has none) fails the fold's flow run as
    bad input: the suite ends in one line naming the fold, after one flow run, not its retries."""
    proc = suite_cli(
        stack,
        learn_cache,
        tmp_path,
        "suite.name=stack-bad-input",
        "suite.variants=[gender]",
        "suite.folds=[1]",
        "suite.mode=deployments",
        "suite.retries=2",
        *TINY_ARGS,
        "train.device=cuda",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "gender-fold1 (flow run" in errors[0], errors
    assert "CUDA" in errors[0], errors
    assert "Traceback" not in out, out[-3000:]
    runs = flow_runs(stack, {"flow_runs": {"name": {"any_": ["gender-fold1"]}}})
    mine = [r for r in runs if "stack-bad-input" in json.dumps(r["tags"])]
    assert [r["state_type"] for r in mine] == ["FAILED"], mine
    assert mine[0]["state"]["message"].startswith("bad input: ")


def test_bad_credentials_and_unreachable_servers_are_clear_errors(
    stack: Any, stack_creds: dict[str, str], learn_cache: Path, tmp_path: Path
) -> None:
    wrong = stack_creds | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    with pytest.raises(StackError, match=rf"S3 at {stack.s3_url} refused the request"):
        ensure_bucket(stack.s3_url, wrong, stack.bucket)
    with pytest.raises(StackError, match=r"S3 at http://127.0.0.1:9 is unreachable"):
        ensure_bucket("http://127.0.0.1:9", stack_creds, stack.bucket)
    # S3 is never anonymous
    anonymous = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, boto3, botocore; from botocore.config import Config; "
            "s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', "
            "config=Config(signature_version=botocore.UNSIGNED)); "
            "s3.list_objects_v2(Bucket=sys.argv[2])",
            stack.s3_url,
            stack.bucket,
        ],
        capture_output=True,
        text=True,
        env=_no_aws(),
    )
    assert anonymous.returncode != 0
    assert "AccessDenied" in anonymous.stderr
    # the MLflow server refuses a foreign Host header (DNS rebinding); its own name works
    api = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    with urllib.request.urlopen(api, timeout=10) as ok:
        assert ok.status == 200
    req = urllib.request.Request(api, headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    # unreachable servers: one line naming the endpoint, no traceback
    script = str(Path(sys.executable).with_name("agegender"))
    base = [script, "suite", "--cache", str(learn_cache), "--run-root", str(tmp_path)]
    for var, value, message in (
        ("MLFLOW_TRACKING_URI", "http://127.0.0.1:9", "error: MLflow at http://127.0.0.1:9 is "),
        ("PREFECT_API_URL", "http://127.0.0.1:9/api", "error: Prefect API at http://127.0.0.1:9"),
    ):
        res = subprocess.run(
            [*base, "suite.variants=[age]"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=_no_aws() | {var: value},
            timeout=120,
        )
        assert res.returncode == 2, res.stderr[-2000:]
        assert message in res.stderr
        assert "unreachable" in res.stderr
        assert "Traceback" not in res.stderr
    # and the stack itself never starts without credentials
    res = subprocess.run(
        [script, "stack", "up", "--run-dir", str(tmp_path / "nocreds")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_no_aws(),
        timeout=60,
    )
    assert res.returncode == 2
    assert "S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set" in res.stderr


def _shown(run_dir: Path) -> list[Path]:
    """The run dir, every folder and file in it (as its owner sees them)."""
    return [run_dir, *run_dir.rglob("*")]


def test_no_other_user_reads_the_stack_run_dir(stack: Any) -> None:
    """Its databases (the GPU deployment's job variables hold the worker's MLflow password),
    the PostgreSQL password, logs and S3's data are the stack user's alone: `nobody` opens
    none of them, even where the run dir itself is opened to passers-by (o+x), because each
    file and folder the servers wrote is private too (their umask 077)."""
    run_dir = stack.run_dir
    stores = ["postgres-password"] if stack.db == "postgres" else ["prefect/prefect.db"]
    secrets = [run_dir / f for f in ["stack.json", *stores]] + list(run_dir.glob("logs/*.log"))
    assert len(secrets) >= len(stack.services) + 2, secrets
    assert {f: f.stat().st_mode & 0o777 for f in secrets} == dict.fromkeys(secrets, 0o600)
    assert opened_by_nobody(_shown(run_dir)) == []
    mode = run_dir.stat().st_mode & 0o777
    run_dir.chmod(mode | 0o011)
    try:
        assert opened_by_nobody(_shown(run_dir)) == []
    finally:
        run_dir.chmod(mode)


def test_stack_up_closes_an_older_run_dir_to_other_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run dir an older version left open (0755 folders, 0644 databases and logs): `stack up`
    closes it, saying so in one line, before it starts anything (here nothing starts: S3's
    port is taken); `nobody` then opens none of it."""
    parent = Path(tempfile.mkdtemp(prefix="agegender-test-old-"))
    parent.chmod(0o711)  # others may pass through, as through any home folder
    run_dir = parent / "stack"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k" * 12)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s" * 16)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            ports = Ports.shifted(151).__dict__ | {"s3": taken.getsockname()[1]}
            old = {"stack.json": json.dumps({"pids": {}, "db": "sqlite", "ports": ports})}
            for name in ("prefect/prefect.db", "mlflow/mlflow.db", "mlflow/mlflow_auth.db"):
                old[name] = "a database"
            old["logs/mlflow.log"] = "a log"
            for name, text in old.items():
                (run_dir / name).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                (run_dir / name).write_text(text)
                (run_dir / name).chmod(0o644)
            shown = _shown(run_dir)
            assert len(opened_by_nobody(shown)) == len(shown) == 9  # what was open
            said: list[str] = []
            with pytest.raises(StackError, match=f"s3: port 127.0.0.1:{ports['s3']} is already"):
                Stack.at(run_dir).up(progress=said.append)
        assert said == [f"{run_dir}: 9 folders and files closed to other users"]
        assert opened_by_nobody(shown) == []
        assert {p: p.stat().st_mode & 0o077 for p in shown} == dict.fromkeys(shown, 0)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_a_killed_worker_is_down_in_status_at_once(stack: Any, stack_creds: dict[str, str]) -> None:
    """Its pool entry stays ONLINE until its heartbeat times out: `stack status` and the
    start's health check read our own worker's process and entry instead."""
    pid = stack.supervisor.pids()["worker"]
    try:
        os.killpg(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
        res = _status(stack, "--json")
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert status["services"]["worker"]["pid"] == pid
        assert status["services"]["worker"]["running"] is False
        assert status["services"]["worker"]["healthy"] is False
        # the dead one's entry, still listed (layout.WORKER_NAME)
        assert "agegender-stack-worker" in status["workers"]["local"]
        text = _status(stack)
        assert re.search(r"^worker +stopped ", text.stdout, re.M), text.stdout
    finally:
        stack.stop("worker")
        stack.start("worker", stack_creds)
    assert stack.healthy("worker")
    assert stack.supervisor.pids()["worker"] != pid


def _pg_kill_restore(stack: Any, creds: dict[str, str]) -> None:
    """The shared stack as the tests after need it: PostgreSQL started again, and each server
    that did not come back on its own restarted."""
    stack.stop("postgres")
    stack.start("postgres", creds)
    for name in ("mlflow", "prefect", "worker"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stack.healthy(name):
            time.sleep(1)
        if not stack.healthy(name):
            stack.stop(name)
            stack.start(name, creds)


def test_postgresql_killed_mid_suite_is_one_error_line_and_status_shows_it(
    stack: Any, stack_creds: dict[str, str], learn_cache: Path, tmp_path: Path
) -> None:
    if stack.db != "postgres":
        pytest.skip("the stack runs on SQLite (AGEGENDER_TEST_DB)")
    proc = suite_cli(
        stack,
        learn_cache,
        tmp_path,
        "suite.name=stack-pg-lost",
        "suite.variants=[gender]",
        "suite.folds=[0]",
        "suite.mode=deployments",
        "train.iterations=150",
        *TINY_ARGS,
    )
    fold: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not list(tmp_path.glob("stack-pg-lost/*/*/last.pt")):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        (run,) = flow_runs(
            stack,
            {
                "flow_runs": {
                    "tags": {"all_": ["suite:stack-pg-lost"]},
                    "name": {"any_": ["gender-fold0"]},
                }
            },
        )
        fold = processes_of(run["id"])
        os.killpg(stack.supervisor.pids()["postgres"], signal.SIGKILL)  # with its backends
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=300)
        took = time.monotonic() - killed
        print(f"the suite ended {took:.1f} s after PostgreSQL was killed")
        assert proc.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out[-3000:]
        assert f"Prefect API at {stack.prefect_api} lost its database" in errors[0]
        assert "PostgreSQL is down" in errors[0]
        assert "`agegender stack status`" in errors[0]
        assert "`agegender stack up`" in errors[0]
        assert "Traceback" not in out, out[-3000:]
        # the status table, with PostgreSQL down and Prefect without its database
        res = _status(stack, "--json")
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert status["services"]["postgres"]["running"] is False
        assert status["services"]["postgres"]["healthy"] is False
        assert status["services"]["prefect"]["running"] is True
        assert status["services"]["prefect"]["healthy"] is False
        assert "HTTP 503" in status["prefect_error"]
        text = _status(stack)
        assert text.returncode == 0, text.stderr
        assert re.search(r"^postgres +stopped ", text.stdout, re.M), text.stdout
        assert re.search(r"^mlflow +healthy ", text.stdout, re.M), text.stdout
        assert "no pools, workers or runs: Prefect API at" in text.stdout
        assert "Traceback" not in text.stdout + text.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        for pid in fold:  # the fold, still training on the worker: stopped (nothing reads it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _pg_kill_restore(stack, stack_creds)
