"""The local service stack without Docker: S3, MLflow, Prefect server and a Prefect worker.

`agegender stack up` starts, on 127.0.0.1 only, a SeaweedFS S3 server (`weed mini`, the bucket
made with boto3), an MLflow tracking server (SQLite backend, artifacts proxied to S3, so clients
need no S3 credentials), a Prefect server (SQLite), the work pools, concurrency limit and
deployments of `deployments/prefect.yaml`, and a process worker on the `local` pool. Each
service is its own process group; PIDs go to `RUN_DIR/stack.json`, logs to `RUN_DIR/logs/`, and
`stack down` stops exactly those groups. Every start waits for the service's health check, never
a fixed sleep. S3 credentials come only from the environment or a `.env` file (never written
anywhere by us); the S3 server refuses anonymous requests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
BIN = Path(sys.executable).parent
SERVICES = ("s3", "mlflow", "prefect", "worker")
POOLS = {"local": "process", "gpu": "docker"}
GPU_LIMIT = "gpu-slots"  # global concurrency limit: folds at once per machine's GPUs


class StackError(RuntimeError):
    """A service that cannot start, answer or be reached; the message names it and its log."""


STARTUP_VAR = "AGEGENDER_STARTUP_TIMEOUT"  # seconds a server may take to become healthy
STARTUP_S = 600.0  # generous: a loaded 2-core machine takes minutes, an idle one seconds


def startup_timeout() -> float:
    """How long any server we start (stack services, test servers) may take to start."""
    raw = os.environ.get(STARTUP_VAR, "")
    try:
        return float(raw) if raw else STARTUP_S
    except ValueError:
        raise StackError(f"{STARTUP_VAR}={raw!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class Ports:
    """Every port the stack listens on (SeaweedFS also uses each port + 10000 for gRPC)."""

    s3: int = 8333
    mlflow: int = 5000
    prefect: int = 4200
    weed_master: int = 9333
    weed_volume: int = 9340
    weed_filer: int = 8888
    weed_admin: int = 23646

    @classmethod
    def shifted(cls, by: int) -> Ports:
        """The default ports + `by`: a second stack beside the first (tests use one)."""
        defaults = cls()
        return cls(**{k: v + by for k, v in defaults.__dict__.items()})


@dataclass(frozen=True)
class Stack:
    run_dir: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    bucket: str = "mlflow"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    @classmethod
    def at(cls, run_dir: Path) -> Stack:
        """The stack of a run directory, on the ports it was started with (defaults if none)."""
        try:
            saved = json.loads((Path(run_dir) / "stack.json").read_text()).get("ports", {})
        except (OSError, ValueError):
            saved = {}
        return cls(Path(run_dir), ports=Ports(**saved))

    def client_env(self) -> dict[str, str]:
        """What a client (the CLI, a test, a worker) needs: no S3 credentials."""
        return {"PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_url}

    # --- processes ---------------------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.run_dir / "stack.json"

    def _pids(self) -> dict[str, int]:
        try:
            data: dict[str, Any] = json.loads(self._state_file().read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.get("pids", {}).items()}

    def _save_pids(self, pids: Mapping[str, int]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "pids": dict(pids),
            "ports": self.ports.__dict__,
            "urls": self.client_env() | {"S3": self.s3_url},
        }
        self._state_file().write_text(json.dumps(state, indent=1))

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _command(self, name: str, creds: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        quiet = {
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | quiet
        if name == "s3":
            argv = [
                str(BIN / "weed"),
                "mini",
                f"-dir={self.run_dir / 's3'}",
                f"-ip={self.host}",
                f"-ip.bind={self.host}",
                f"-s3.port={self.ports.s3}",
                f"-master.port={self.ports.weed_master}",
                f"-volume.port={self.ports.weed_volume}",
                f"-filer.port={self.ports.weed_filer}",
                f"-admin.port={self.ports.weed_admin}",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
            ]
            return argv, env | dict(creds)  # the credentials become its admin identity
        if name == "mlflow":
            hosts = f"localhost,localhost:*,{self.host},{self.host}:*"
            argv = [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.run_dir / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{self.bucket}/artifacts",
                "--host",
                self.host,
                "--port",
                str(self.ports.mlflow),
                "--workers",
                "1",
                "--allowed-hosts",
                hosts,
            ]
            extra = {
                "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            }
            return argv, env | dict(creds) | extra
        if name == "prefect":
            argv = [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                self.host,
                "--port",
                str(self.ports.prefect),
            ]
            return argv, env | {"PREFECT_HOME": str(self.run_dir / "prefect")}
        if name == "worker":
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--type", "process"]
            return argv, env | self.client_env() | {"PREFECT_HOME": str(self.run_dir / "worker")}
        raise ValueError(f"unknown service {name!r}; the stack has {', '.join(SERVICES)}")

    def start(self, name: str, creds: Mapping[str, str] | None = None) -> int:
        """Start one service in its own process group and wait until it is healthy."""
        creds = creds if creds is not None else credentials()
        pids = self._pids()
        if name in pids and alive(pids[name]):
            raise StackError(
                f"{name} already runs (pid {pids[name]}); `agegender stack down` first"
            )
        port = getattr(self.ports, name, None)
        if port is not None and port_open(self.host, port):
            raise StackError(
                f"{name}: port {self.host}:{port} is already in use (another stack? "
                "`agegender stack down`, or choose other ports)"
            )
        argv, env = self._command(name, creds)
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        (self.run_dir / name).mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._save_pids(pids | {name: proc.pid})
        try:
            self._wait_healthy(name, creds, proc)
        except BaseException:
            self.stop(name)
            raise
        return proc.pid

    def _wait_healthy(
        self, name: str, creds: Mapping[str, str], proc: subprocess.Popen[bytes]
    ) -> None:
        limit = startup_timeout()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with status {proc.returncode} while starting; see "
                    f"{self.log(name)}:\n{tail(self.log(name))}"
                )
            if self.healthy(name, creds):
                return
            time.sleep(0.5)
        raise StackError(
            f"{name} was not healthy after {limit:.0f} s; see {self.log(name)} (on a busy "
            f"machine raise {STARTUP_VAR})"
        )

    def healthy(self, name: str, creds: Mapping[str, str] | None = None) -> bool:
        """The service's health check (S3: a signed request with `creds`, else its port)."""
        if name == "s3":
            return s3_ready(self.s3_url, creds) if creds else port_open(self.host, self.ports.s3)
        if name == "mlflow":
            return http_ok(f"{self.mlflow_url}/health")
        if name == "prefect":
            return http_ok(f"{self.prefect_api}/health")
        return self._worker_online()

    def _worker_online(self) -> bool:
        try:
            workers = _api(self.prefect_api, "POST", "/work_pools/local/workers/filter", {})
        except StackError:
            return False
        return any(w.get("status") == "ONLINE" for w in workers)

    def stop(self, name: str, grace: float = 15.0) -> bool:
        """Stop exactly the process group this stack started for `name`."""
        pids = self._pids()
        pid = pids.pop(name, None)
        stopped = False
        if pid is not None and alive(pid):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and alive(pid):
                    time.sleep(0.2)
                if not alive(pid):
                    break
            stopped = True
        self._save_pids(pids)
        return stopped

    # --- the whole stack --------------------------------------------------------------------

    def up(self, progress: Callable[[str], None] = print) -> dict[str, str]:
        creds = credentials()
        for name in ("s3", "mlflow", "prefect"):
            started = time.monotonic()
            self.start(name, creds)
            progress(f"{name} healthy in {time.monotonic() - started:.1f} s")
        ensure_bucket(self.s3_url, creds, self.bucket)
        progress(f"bucket s3://{self.bucket} ready")
        started = time.monotonic()
        self.setup()
        progress(f"work pools, limits and deployments in {time.monotonic() - started:.1f} s")
        self.start("worker", creds)
        progress("worker online on pool 'local'")
        return self.client_env()

    def setup(self, gpu_slots: int | None = None) -> None:
        """Work pools, the GPU concurrency limit (one fold per GPU of this machine, at least
        one) and the deployments of prefect.yaml."""
        gpu_slots = gpu_slots or max(count_gpus(), 1)
        (self.run_dir / "worker").mkdir(parents=True, exist_ok=True)
        env = os.environ | self.client_env() | {"PREFECT_HOME": str(self.run_dir / "worker")}
        env.setdefault("AGEGENDER_WORKER_IMAGE", "agegender-worker:latest")
        env["AGEGENDER_HOME"] = str(REPO)  # where the local pool's flows run
        for pool, kind in POOLS.items():
            _prefect(["work-pool", "create", pool, "--type", kind, "--overwrite"], env)
        _prefect(
            ["global-concurrency-limit", "create", GPU_LIMIT, "--limit", str(gpu_slots)],
            env,
            ok_if="already exists",
        )
        _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)], env)

    def down(self) -> list[str]:
        """Stop every service this run directory started, worker first."""
        return [n for n in reversed(SERVICES) if self.stop(n)]

    def status(self) -> dict[str, Any]:
        pids = self._pids()
        out: dict[str, Any] = {"run_dir": str(self.run_dir), "services": {}}
        urls = {"s3": self.s3_url, "mlflow": self.mlflow_url, "prefect": self.prefect_api}
        for name in SERVICES:
            pid = pids.get(name)
            out["services"][name] = {
                "pid": pid,
                "running": bool(pid and alive(pid)),
                "healthy": self.healthy(name),
                "url": urls.get(name, ""),
                "log": str(self.log(name)),
            }
        if out["services"]["prefect"]["healthy"]:
            out["pools"] = {
                p["name"]: {"type": p["type"], "status": p.get("status")}
                for p in _api(self.prefect_api, "POST", "/work_pools/filter", {})
            }
            out["workers"] = {
                pool: [
                    w["name"]
                    for w in _api(
                        self.prefect_api, "POST", f"/work_pools/{pool}/workers/filter", {}
                    )
                ]
                for pool in out["pools"]
            }
            out["deployments"] = [
                d["name"] for d in _api(self.prefect_api, "POST", "/deployments/filter", {})
            ]
            runs = _api(
                self.prefect_api,
                "POST",
                "/flow_runs/filter",
                {"sort": "START_TIME_DESC", "limit": 5},
            )
            out["last_runs"] = [
                {"name": r["name"], "state": r.get("state_type"), "start": r.get("start_time")}
                for r in runs
            ]
        return out


# --- helpers ---------------------------------------------------------------------------------


def credentials(env_file: Path = REPO / ".env") -> dict[str, str]:
    """S3 credentials from the environment, else from `.env` (KEY=VALUE lines); never defaults."""
    values = {
        k: os.environ[k]
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if os.environ.get(k)
    }
    if len(values) < 2 and env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") and key not in values:
                values[key] = value.strip().strip("'\"")
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not values.get(k)]
    if missing:
        raise StackError(
            f"S3 credentials: {' and '.join(missing)} not set; put them in the environment or in "
            f"{env_file} (see .env.example); the S3 server never runs anonymously"
        )
    return values


def count_gpus() -> int:
    """NVIDIA GPUs on this machine, without importing torch (0 when there is no driver)."""
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in res.stdout.splitlines())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _api(base: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise StackError(f"Prefect API at {base}: {method} {path} failed ({exc})") from None


def _prefect(args: list[str], env: Mapping[str, str], ok_if: str | None = None) -> None:
    res = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and not (ok_if and ok_if in (res.stdout + res.stderr)):
        raise StackError(f"`prefect {' '.join(args)}` failed:\n{(res.stdout + res.stderr)[-2000:]}")


def _s3(url: str, creds: Mapping[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def s3_ready(url: str, creds: Mapping[str, str]) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3(url, creds).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def ensure_bucket(url: str, creds: Mapping[str, str], bucket: str) -> None:
    """Create the bucket if needed; bad credentials or no server: an error naming the endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3(url, creds)
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in names:
            client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise StackError(
            f"S3 at {url} refused the request ({err.get('Code')}: {err.get('Message')}); "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from None
    except BotoCoreError as exc:
        raise StackError(f"S3 at {url} is unreachable ({exc})") from None


def list_objects(url: str, creds: Mapping[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every key under `prefix` (for checks and tests)."""
    client = _s3(url, creds)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
