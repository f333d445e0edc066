"""A second host on this machine: a network namespace joined to the host by a veth pair, with
its own private addresses. The stack listens on the host end; a process worker runs inside
the namespace, as on another machine, with nothing but the settings a worker machine is given.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import random
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.commands import BIN
from deployments.credentials import AUTH_SECRET_VARS
from deployments.layout import S3_GATEWAY, Ports
from deployments.s3 import list_objects
from deployments.services import DEFAULTS, apply_defaults, basic_auth
from deployments.stack import Stack
from deployments.supervisor import startup_timeout, tail
from tests.conftest import (
    REPO,
    TINY_ARGS,
    flow_runs,
    prefect_api,
    processes_of,
    scale_out_params,
    suite_cli,
)

pytestmark = pytest.mark.integration

# RFC 2544's benchmarking block: reserved for tests, never routed on real networks
PRIVATE = ipaddress.ip_network("198.18.0.0/15")
AGEGENDER = Path(sys.executable).with_name("agegender")


@dataclass(frozen=True)
class Netns:
    """A namespace `name` whose `ns_if` (address `ns_addr`) is the peer of the host's `host_if`
    (address `host_addr`); the two form a /30 and nothing else is routed."""

    name: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str

    def exec(self, *argv: str | Path) -> list[str]:
        """A command line that runs `argv` inside the namespace."""
        return [_ip(), "netns", "exec", self.name, *map(str, argv)]

    def pids(self) -> list[int]:
        res = _run(_ip(), "netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace, as when the machine is lost; waits until
        they are gone (bounded)."""
        deadline = time.monotonic() + 60
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        assert not self.pids(), f"processes left in namespace {self.name}: {self.pids()}"


def _ip() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")
    return res


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 of PRIVATE that no address or route of this machine overlaps."""
    used = []
    routes = json.loads(_run(_ip(), "-j", "route", "show", "table", "all").stdout or "[]")
    for r in routes:
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(r.get("dst", ""), strict=False))
    for link in json.loads(_run(_ip(), "-j", "addr").stdout or "[]"):
        for a in link.get("addr_info", []):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    subnets = int(PRIVATE.num_addresses // 4)
    for _ in range(100):
        base = PRIVATE.network_address + 4 * random.randrange(subnets)
        net = ipaddress.IPv4Network(f"{base}/30")
        if not any(net.version == u.version and net.overlaps(u) for u in used):
            return net
    raise AssertionError(f"no free /30 in {PRIVATE} after 100 tries")


def _remove(ns: Netns) -> None:
    """Namespace and veth gone, whatever state they are in (a stale one from a killed run)."""
    if ns.name in _run(_ip(), "netns", "list", check=False).stdout.split():
        ns.kill_all()
    _run(_ip(), "link", "del", ns.host_if, check=False)  # takes its peer with it
    _run(_ip(), "netns", "del", ns.name, check=False)


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    """A second host: namespace + veth pair with a random private /30, `lo` up inside; always
    removed at the end, and first if a killed earlier run left one of the same name."""
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root (CI runs the tests as root)")
    if _run(_ip(), "netns", "list", check=False).returncode != 0:
        pytest.skip(f"no `ip netns` here ({_ip()}); install iproute2 (.ci/run does)")
    tag = f"ag{os.getpid()}"
    net = _free_subnet()
    host_addr, ns_addr = (str(a) for a in net.hosts())
    ns = Netns(tag, f"{tag}h", f"{tag}n", host_addr, ns_addr)
    _remove(ns)
    try:
        _run(_ip(), "netns", "add", ns.name)
        _run(_ip(), "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        _run(_ip(), "link", "set", ns.ns_if, "netns", ns.name)
        _run(_ip(), "addr", "add", f"{host_addr}/30", "dev", ns.host_if)
        _run(_ip(), "link", "set", ns.host_if, "up")
        _run(_ip(), "-n", ns.name, "addr", "add", f"{ns_addr}/30", "dev", ns.ns_if)
        _run(_ip(), "-n", ns.name, "link", "set", ns.ns_if, "up")
        _run(_ip(), "-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        _remove(ns)
        left = _run(_ip(), "netns", "list", check=False).stdout.split()
        assert ns.name not in left, f"namespace {ns.name} was not removed"
        assert _run(_ip(), "link", "show", ns.host_if, check=False).returncode != 0


# --- the stack on the host end, a worker in the namespace ------------------------------------

# Run inside the namespace: what a process there reaches. Each probe is ["tcp", host, port] (a
# connection: "open" or "refused") or [method, url, headers] (an HTTP status).
PROBE = """
import json, socket, sys, urllib.error, urllib.request
out = []
for kind, target, extra in json.loads(sys.argv[1]):
    if kind == "tcp":
        with socket.socket() as s:
            s.settimeout(5)
            out.append("open" if s.connect_ex((target, extra)) == 0 else "refused")
        continue
    body = b"{}" if kind == "POST" else None
    headers = {"Content-Type": "application/json", **extra}
    req = urllib.request.Request(target, data=body, method=kind, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out.append(r.status)
    except urllib.error.HTTPError as exc:
        out.append(exc.code)
print(json.dumps(out))
"""


def _in_ns(ns: Netns, probes: list[tuple[str, str, Any]]) -> list[Any]:
    """Each probe's outcome, seen from inside the namespace."""
    res = subprocess.run(
        ns.exec(sys.executable, "-c", PROBE, json.dumps(probes)),
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out: list[Any] = json.loads(res.stdout)
    return out


_S3_CREDS: dict[str, str] = {}  # the host stack's: its servers', and this test's bucket checks


@functools.cache
def _printed_for_worker(run_dir: Path) -> tuple[tuple[str, str], ...]:
    res = subprocess.run(
        [str(AGEGENDER), "stack", "env", "--for-worker", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.removeprefix("export ") for line in res.stdout.splitlines()]
    assert all("=" in line for line in lines), res.stdout
    return tuple((k, shlex.split(v)[0]) for k, _, v in (line.partition("=") for line in lines))


def _for_worker(st: Stack) -> dict[str, str]:
    """What a worker machine is given: the lines `agegender stack env --for-worker` prints."""
    return dict(_printed_for_worker(st.run_dir))


@pytest.fixture(scope="module")
def host_stack(netns: Netns) -> Iterator[Stack]:
    """The stack (`up`, auth on) on the host end of the veth pair, not on 127.0.0.1, with
    fresh credentials; no worker of its own: the pool's only workers are the namespace's.
    The servers' passwords stay in this process's environment (its admin calls); the S3
    keys only while the servers start. Heartbeats every 30 s: a killed fold is CRASHED after
    90 s."""
    creds = _S3_CREDS
    creds.update(
        AWS_ACCESS_KEY_ID="agegender-" + secrets.token_hex(4),
        AWS_SECRET_ACCESS_KEY=secrets.token_hex(16),
    )
    passwords = {k: "netns-" + secrets.token_hex(12) for k in AUTH_SECRET_VARS}
    passwords["PREFECT_API_AUTH_STRING"] = "agegender:" + secrets.token_hex(12)
    # beside the test stack's ports (+1: test_postgres's), moved by AGEGENDER_TEST_PORT_SHIFT
    shift = 101 + int(os.environ.get("AGEGENDER_TEST_PORT_SHIFT", "0")) + 2
    run_dir = Path(tempfile.mkdtemp(prefix="agegender-test-netns-"))
    run_dir.chmod(0o711)
    st = Stack(
        run_dir / "stack",
        ports=Ports.shifted(shift),
        host=netns.host_addr,
        auth=True,
        heartbeat_s=30,
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (passwords | creds).items():
            mp.setenv(k, v)
        try:
            st.up(progress=lambda m: print(f"netns stack: {m}"), worker=False)
            for k in creds:
                mp.delenv(k)
            yield st
        finally:
            netns.kill_all()  # its workers first: they would only retry against stopped servers
            st.down()
            shutil.rmtree(run_dir, ignore_errors=True)


def _worker_env(st: Stack) -> dict[str, str]:
    """A bare environment plus the worker machine's settings: nothing of this process's
    (no URL, no credential) reaches the worker."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(st.run_dir / "netns-worker"),
        "LANG": "C.UTF-8",
        "PREFECT_HOME": str(st.run_dir / "netns-worker"),
    }
    if os.environ.get("PYTHONPATH"):  # a checkout beside the venv's own (git worktrees)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    apply_defaults(env)
    return env | _for_worker(st)


def _workers(st: Stack) -> dict[str, str]:
    """The local pool's workers: name -> status."""
    found = st.prefect()("POST", "/work_pools/local/workers/filter", {})
    return {w["name"]: w.get("status") for w in found}


def _start_worker(ns: Netns, st: Stack, name: str) -> subprocess.Popen[bytes]:
    """A process worker inside the namespace, waited for until the server lists it online."""
    argv = ns.exec(
        BIN / "prefect", "worker", "start", "--pool", "local", "--type", "process", "--name", name
    )
    (st.run_dir / "netns-worker").mkdir(parents=True, exist_ok=True)
    log = st.log(name)
    proc = st.supervisor.launch(name, argv, _worker_env(st), REPO)
    deadline = time.monotonic() + startup_timeout()
    while _workers(st).get(name) != "ONLINE":
        assert proc.poll() is None, f"worker {name} exited:\n{tail(log, 40)}"
        assert time.monotonic() < deadline, f"worker {name} never came online:\n{tail(log, 40)}"
        time.sleep(1)
    return proc


@pytest.fixture(scope="module")
def workers() -> list[subprocess.Popen[bytes]]:
    """Every worker started in the namespace (the namespace's removal ends them all)."""
    return []


@pytest.fixture
def worker(
    netns: Netns, host_stack: Stack, workers: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """The namespace's worker: the one still running, else a new one."""
    live = [w for w in workers if w.poll() is None]
    if not live:
        live.append(_start_worker(netns, host_stack, f"netns-worker-{len(workers) + 1}"))
        workers.append(live[0])
    return live[-1]


def _worker_name(proc: subprocess.Popen[bytes]) -> str:
    args = [str(a) for a in proc.args]  # type: ignore[union-attr]
    return args[args.index("--name") + 1]


@contextlib.contextmanager
def _admin(st: Stack) -> Iterator[None]:
    """This process as the stack's admin: Prefect and MLflow calls in-process."""
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    admin = st.auth_env("admin")
    auth = {PREFECT_API_AUTH_STRING: admin["PREFECT_API_AUTH_STRING"]}
    with prefect_api(st), temporary_settings(updates=auth), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", st.mlflow_url)
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(k, admin[k])
        yield


def test_stack_env_for_worker_sends_the_heartbeat_the_crash_automation_expects(
    tmp_path: Path,
) -> None:
    """A worker machine's flow runs must beat as often as the stack's automation expects: at
    a slower beat their healthy runs would be marked CRASHED. No server needed."""
    st = Stack(tmp_path / "stack", host="198.18.0.1", auth=True, heartbeat_s=30)
    st.save_state({})  # the state `stack up` leaves
    passwords = {k: "netns-" + secrets.token_hex(12) for k in AUTH_SECRET_VARS}
    passwords["PREFECT_API_AUTH_STRING"] = "agegender:" + secrets.token_hex(12)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in passwords.items():
            mp.setenv(k, v)
        given = dict(_printed_for_worker(st.run_dir))
    assert given["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert Stack.at(st.run_dir).heartbeat_s == 30


def test_the_namespace_reaches_the_stack_only_through_the_veth_pair(
    netns: Netns, host_stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    st = host_stack
    given = _for_worker(st)
    assert set(given) == set(DEFAULTS) | {
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_API_URL",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
    }  # no S3 credential: workers go through MLflow's artifact proxy, for every file
    assert given["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    assert given["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "false"
    assert given["PREFECT_API_URL"] == f"http://{netns.host_addr}:{st.ports.prefect}/api"
    assert given["MLFLOW_TRACKING_URI"] == f"http://{netns.host_addr}:{st.ports.mlflow}"
    # the heartbeat the stack's crash automation expects (30 s here), not Prefect's default
    assert given["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert given["MLFLOW_TRACKING_USERNAME"] == st.auth_env("worker")["MLFLOW_TRACKING_USERNAME"]
    for value in _worker_env(st).values():
        assert "127.0.0.1" not in value, value
        assert "localhost" not in value, value
    ports = {"prefect": st.ports.prefect, "mlflow": st.ports.mlflow, "s3": st.ports.s3}
    hosts = ("127.0.0.1", netns.host_addr)
    seen = _in_ns(netns, [("tcp", h, p) for p in ports.values() for h in hosts])
    # loopback in there is empty; the host end of the pair has the servers
    assert seen == ["refused", "open"] * len(ports)
    # the namespace has its loopback and its end of the pair; its only route is the pair's /30
    links = json.loads(_run(_ip(), "-n", netns.name, "-j", "addr").stdout)
    addrs = {
        a["local"] for link in links for a in link.get("addr_info", []) if a["family"] == "inet"
    }
    assert addrs == {"127.0.0.1", netns.ns_addr}
    routes = json.loads(_run(_ip(), "-n", netns.name, "-j", "route").stdout)
    pair = ipaddress.ip_network(f"{netns.ns_addr}/30", strict=False)
    assert [r["dst"] for r in routes] == [str(pair)]


def test_unauthenticated_requests_from_the_namespace_are_refused(
    netns: Netns, host_stack: Stack
) -> None:
    st = host_stack
    given = _for_worker(st)
    prefect = basic_auth(given["PREFECT_API_AUTH_STRING"])
    mlflow = basic_auth(f"{given['MLFLOW_TRACKING_USERNAME']}:{given['MLFLOW_TRACKING_PASSWORD']}")
    wrong = basic_auth(given["PREFECT_API_AUTH_STRING"].split(":")[0] + ":not-the-password")
    runs = ("POST", f"{st.prefect_api}/flow_runs/filter")
    experiments = ("GET", f"{st.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1")
    proxy = ("GET", f"{st.mlflow_url}/api/2.0/mlflow-artifacts/artifacts")
    bucket = ("GET", f"{st.s3_public_url}/{st.bucket}")
    probes = [
        (*runs, {}),
        (*runs, wrong),
        (*runs, prefect),  # the control: the worker's settings are let in
        (*experiments, {}),
        (*experiments, wrong),
        (*proxy, {}),
        (*experiments, mlflow),
        (*bucket, {}),  # unsigned
        (*bucket, mlflow),  # a password is no S3 signature
    ]
    seen = _in_ns(netns, probes)
    asked = [f"{method} {url}" for method, url, _ in probes]  # not the headers: secrets
    assert seen == [401, 401, 200, 401, 401, 401, 200, 403, 403], (asked, seen)


def test_a_worker_in_the_namespace_takes_a_cross_validate_runs_folds(
    netns: Netns,
    host_stack: Stack,
    worker: subprocess.Popen[bytes],
    learn_cache: Path,
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    st = host_stack
    params = scale_out_params("netns-folds", learn_cache, tmp_path)
    assert list(_workers(st)) == [_worker_name(worker)]  # the pool's only worker
    with _admin(st):
        run = run_deployment(
            "cross_validate/cross-validate", parameters=params, timeout=900, poll_interval=2
        )
        assert isinstance(run, FlowRun)
        assert run.state is not None
        assert run.state.is_completed(), (run.state, tail(st.log(_worker_name(worker)), 40))
        folds = flow_runs(st, {"flow_runs": {"name": {"any_": ["gender-fold0", "gender-fold1"]}}})
        assert sorted(r["state_type"] for r in folds) == ["COMPLETED", "COMPLETED"]
        # the namespace's worker took the cross-validate run and both folds
        log = st.log(_worker_name(worker)).read_text(errors="replace")
        for flow_run_id in [str(run.id), *(r["id"] for r in folds)]:
            assert flow_run_id in log, flow_run_id

        client = MlflowClient()
        exp = client.get_experiment_by_name("netns-folds")
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
        assert sorted(r.data.tags["fold"] for r in runs) == ["0", "1"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        for r in runs:
            history = client.get_metric_history(r.info.run_id, "val_loss")
            assert [m.step for m in history] == list(range(1, len(history) + 1))
            assert history, r.info.run_id
            logged = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert {"best.pt", "result.json"} <= logged, logged
    keys = list_objects(st.s3_url, _S3_CREDS, st.bucket)  # on the host, with the S3 keys
    for r in runs:
        for name in ("best.pt", "result.json", "learning_curves.png"):
            tail_ = f"/{exp.experiment_id}/{r.info.run_id}/artifacts/{name}"
            assert any(k.endswith(tail_) for k in keys), tail_


def test_a_worker_killed_mid_fold_in_the_namespace_is_crashed_and_the_fold_resumed(
    netns: Netns,
    host_stack: Stack,
    worker: subprocess.Popen[bytes],
    workers: list[subprocess.Popen[bytes]],
    learn_cache: Path,
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    st = host_stack
    body = {"flow_runs": {"name": {"any_": ["multitask-fold0"]}}}
    proc = suite_cli(
        st,
        learn_cache,
        tmp_path,
        "suite.name=netns-kill",
        "suite.variants=[multitask]",
        "suite.folds=[0]",
        "suite.mode=deployments",
        "train.iterations=150",
        *TINY_ARGS,
    )
    try:
        checkpoints: list[Path] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not checkpoints:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert worker.poll() is None, tail(st.log(_worker_name(worker)), 40)
            checkpoints = list(tmp_path.glob("netns-kill/multitask/fold0-*/last.pt"))
            time.sleep(0.2)
        assert checkpoints, "no checkpoint was written"
        (first,) = flow_runs(st, body)
        fold = processes_of(first["id"])
        assert fold, "the fold's process was not found"
        assert set(fold) <= set(netns.pids())  # it runs on the second host
        netns.kill_all()  # the worker and its fold die at once: the machine is lost
        worker.wait(timeout=60)
        assert not (checkpoints[0].parent / "result.json").exists()
        second = _start_worker(netns, st, f"netns-worker-{len(workers) + 1}")
        workers.append(second)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    log = st.log(_worker_name(second)).read_text(errors="replace")
    assert "multitask fold 0: resuming from its checkpoint" in log
    runs = sorted(flow_runs(st, body), key=lambda r: r["expected_start_time"])
    assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"]
    assert "no heartbeat for 90 s" in runs[0]["state"]["message"]  # the server's automation
    assert runs[1]["id"] in log  # started again on the namespace's new worker
    with _admin(st):
        client = MlflowClient()
        exp = client.get_experiment_by_name("netns-kill")
        assert exp is not None
        (fold_run,) = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
        assert fold_run.info.status == "FINISHED"
        history = client.get_metric_history(fold_run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1))  # no epoch lost


def _group_rss_mb(pgid: int) -> float:
    """The resident memory of a service's whole process group (MLflow's and Prefect's servers
    run workers of their own), in MB."""
    total = 0
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int((proc / "statm").read_text().split()[1])
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def _send(url: str, head: str, size: int = 0, chunked: bool = False) -> tuple[int, str]:
    """One raw request to `url`'s host: `head`'s lines, then `size` bytes of body (in chunks if
    `chunked`) for as long as the server reads them; its status line and headers."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    block = b"\0" * (1 << 16)
    frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(f"{head}\r\nHost: {host}:{port}\r\n\r\n".encode())
        sent = 0
        while sent < size:
            readable, _, _ = select.select([s], [s], [], 120)
            if readable:
                break
            try:
                s.sendall(frame)
            except OSError:  # refused and closed: the answer waits in the socket
                break
            sent += len(block)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer and (got := s.recv(1 << 16)):
                answer += got
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return int(status.split()[1]) if status.startswith("HTTP/") else 0, answer.decode("latin-1")


def test_the_front_doors_refuse_bodies_before_the_servers_read_them(host_stack: Stack) -> None:
    """Issue 26: on the listen address an unauthenticated 256 MiB body gets 401 and a 1 GiB one
    401 or 413 at once, an authenticated 1 GiB one 413 (Content-Length or chunked), while the
    MLflow and Prefect servers' memory stays flat; a malformed request to the S3 relay gets
    400 and one log line; the 11th wrong password from one address gets 429. Last in this
    module: that address (the host's) is then refused credentials for a minute."""
    st = host_stack
    admin = st.auth_env("admin")
    mlflow_auth = basic_auth(
        f"{admin['MLFLOW_TRACKING_USERNAME']}:{admin['MLFLOW_TRACKING_PASSWORD']}"
    )
    prefect_auth = basic_auth(admin["PREFECT_API_AUTH_STRING"])
    pids = st.supervisor.pids()
    before = {name: _group_rss_mb(pids[name]) for name in ("mlflow", "prefect")}
    search = "POST /api/2.0/mlflow/experiments/search HTTP/1.1\r\nContent-Type: application/json"
    flows = "POST /api/flows/filter HTTP/1.1\r\nContent-Type: application/json"
    big, over = 1 << 30, f"Content-Length: {1 << 30}"
    assert _send(st.mlflow_url, f"{search}\r\nContent-Length: {256 << 20}", 256 << 20)[0] == 401
    assert _send(st.mlflow_url, f"{search}\r\n{over}", big)[0] in (401, 413)
    assert _send(st.prefect_api, f"{flows}\r\n{over}", big)[0] in (401, 413)
    mlflow_login = f"Authorization: {mlflow_auth['Authorization']}"
    prefect_login = f"Authorization: {prefect_auth['Authorization']}"
    assert _send(st.mlflow_url, f"{search}\r\n{mlflow_login}\r\n{over}", big)[0] == 413
    chunked = f"{flows}\r\n{prefect_login}\r\nTransfer-Encoding: chunked"
    assert _send(st.prefect_api, chunked, big, chunked=True)[0] == 413
    after = {name: _group_rss_mb(pids[name]) for name in ("mlflow", "prefect")}
    assert all(after[n] - before[n] < 100 for n in after), (before, after)
    # the servers still answer their callers
    ok = "GET /api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.1"
    assert _send(st.mlflow_url, f"{ok}\r\n{mlflow_login}")[0] == 200

    assert _send(st.s3_public_url, "GARBAGE")[0] == 400
    log = st.log(S3_GATEWAY).read_text()
    assert "(malformed request) 400" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]

    wrong = basic_auth(f"{admin['MLFLOW_TRACKING_USERNAME']}:not-the-password")["Authorization"]
    get = f"GET /api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.1\r\nAuthorization: {wrong}"
    codes = [_send(st.mlflow_url, get)[0] for _ in range(11)]
    assert codes == [401] * 10 + [429], codes
    status, answer = _send(st.mlflow_url, get)
    assert status == 429
    assert "Retry-After:" in answer, answer
