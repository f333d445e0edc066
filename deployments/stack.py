"""The local service stack without Docker: S3, MLflow, Prefect server and a Prefect worker.

`agegender stack up` starts, on 127.0.0.1 only, a SeaweedFS S3 server (`weed mini`, the bucket
made with boto3), an MLflow tracking server (artifacts proxied to S3, so clients need no S3
credentials), a Prefect server, the work pools, concurrency limit and deployments of
`deployments/prefect.yaml`, and a process worker on the `local` pool. Both servers keep their
data in SQLite, or (`--db postgres`, as the compose stack does) in a private PostgreSQL server
from Debian's packages, with its own data folder, role and password under the run dir. Each
service is its own process group; PIDs go to `RUN_DIR/stack.json`, logs to `RUN_DIR/logs/`, and
`stack down` stops exactly those groups. Every start waits for the service's health check, never
a fixed sleep. S3 credentials come only from the environment or a `.env` file (never written
anywhere by us); the S3 server refuses anonymous requests.

`--listen ADDR` puts the Prefect server, the MLflow server and S3 (a relay, `s3proxy`) on ADDR,
for workers on other machines; SeaweedFS itself and PostgreSQL stay on 127.0.0.1. Beyond loopback
the servers must ask who calls (`Auth`, from the environment or `.env` only): Prefect's basic
auth string, MLflow's `basic-auth` app (an admin, a `worker` user that writes runs, a `reader`
that only looks), S3's signed requests.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
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

from deployments.automations import (
    HEARTBEAT_S,
    crash_detection,
    ensure_zombie_automation,
    heartbeat_env,
)
from deployments.mlflow_users import UsersError, ensure_users
from deployments.schedules import check_parameters, describe, next_date
from deployments.services import (
    DEFAULTS,
    GPU_LIMIT,
    MLFLOW_PASSWORD_VAR,
    MLFLOW_USER_VAR,
    PREFECT_AUTH_VAR,
    apply_defaults,
    basic_auth,
    health,
)

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
BIN = Path(sys.executable).parent
SERVICES = ("s3", "mlflow", "prefect", "worker")
DATABASES = ("sqlite", "postgres")
POOLS = {"local": "process", "gpu": "docker"}
# What a pool's base job template must pass on, per pool type: the GPU deployment's device
# request and shm_size travel in `container_create_kwargs`, which Prefect's bundled docker
# template (used when prefect-docker is not installed) silently lacks.
POOL_VARIABLES = {"docker": ("container_create_kwargs", "volumes", "networks", "env", "image")}
PG_ROLE = "agegender"  # the role Prefect and MLflow log in as; owns both databases
PG_DATABASES = ("prefect", "mlflow", "mlflow_auth")  # mlflow_auth: its basic-auth users
LOCAL = "127.0.0.1"  # where what only the stack itself talks to listens (PostgreSQL, SeaweedFS)
S3_GATEWAY = "s3-gateway"  # S3 relayed to the --listen address (SeaweedFS itself stays local)

# Authentication (`Auth`): the environment or `.env` only, never a default. Prefect's client
# setting (the server gets the same string as PREFECT_SERVER_API_AUTH_STRING) and MLflow's own
# basic-auth bootstrap variables; two more MLflow users that the stack makes through its REST API.
MLFLOW_ADMIN_USER_VAR = "MLFLOW_AUTH_ADMIN_USERNAME"  # default "admin"
MLFLOW_ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_PASSWORD"
WORKER_USER_VAR = "AGEGENDER_MLFLOW_WORKER_USER"  # default "worker": writes runs and models
WORKER_PASSWORD_VAR = "AGEGENDER_MLFLOW_WORKER_PASSWORD"
READER_USER_VAR = "AGEGENDER_MLFLOW_READER_USER"  # default "reader": reads, writes nothing
READER_PASSWORD_VAR = "AGEGENDER_MLFLOW_READER_PASSWORD"
AUTH_SECRET_VARS = (
    PREFECT_AUTH_VAR,
    MLFLOW_ADMIN_PASSWORD_VAR,
    WORKER_PASSWORD_VAR,
    READER_PASSWORD_VAR,
)
AUTH_VARS = (*AUTH_SECRET_VARS, MLFLOW_ADMIN_USER_VAR, WORKER_USER_VAR, READER_USER_VAR)
MLFLOW_MIN_PASSWORD = 12  # MLflow's own rule for its users' passwords


# MLflow 3 clients move artifacts over its multipart size straight to S3 (presigned URLs) when
# the server offers it; a worker elsewhere sends everything through the MLflow server instead
PROXIED_ARTIFACTS = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
}

# never passed on to a service that does not need it (`Stack._command`)
SECRETS = (
    *AUTH_VARS,
    MLFLOW_USER_VAR,
    MLFLOW_PASSWORD_VAR,
    "PREFECT_SERVER_API_AUTH_STRING",
)


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
    postgres: int = 15432  # only with --db postgres (not 5432: a system server may have it)

    @classmethod
    def shifted(cls, by: int) -> Ports:
        """The default ports + `by`: a second stack beside the first (tests use one)."""
        defaults = cls()
        return cls(**{k: v + by for k, v in defaults.__dict__.items()})


@dataclass(frozen=True)
class Auth:
    """Who may call the servers: Prefect's "user:password" and MLflow's three users (name,
    password). Read by `auth_settings`, never stored by the stack."""

    prefect: str
    admin: tuple[str, str]
    worker: tuple[str, str]
    reader: tuple[str, str]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: another machine may resolve it to us
        return False


def check_listen(host: str) -> None:
    """One IPv4 address that workers can reach (their URLs name it): not a wildcard."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise StackError(
            f"--listen {host!r}: expected this machine's IPv4 address that the workers reach "
            "(e.g. 192.168.1.10), or 127.0.0.1"
        ) from None
    if addr.version != 4 or addr.is_unspecified:
        raise StackError(
            f"--listen {host}: give one IPv4 address of this machine that the workers reach "
            "(the URLs `agegender stack env --for-worker` prints name it); every-interface "
            "addresses (0.0.0.0) and IPv6 are not supported"
        )


@dataclass(frozen=True)
class Stack:
    run_dir: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"  # where Prefect, MLflow and S3 listen (`--listen`)
    bucket: str = "mlflow"
    heartbeat_s: int = HEARTBEAT_S  # flow-run heartbeats; silent for 3 of them = CRASHED
    db: str = "sqlite"  # where Prefect and MLflow keep their data: sqlite or postgres
    auth: bool = False  # the servers ask for credentials (`Auth`); required beyond loopback

    @property
    def public(self) -> bool:
        """Listening beyond this machine's loopback (other machines may call)."""
        return not is_loopback(self.host)

    @property
    def local_host(self) -> str:
        """Where PostgreSQL and SeaweedFS's own servers listen: never beyond loopback."""
        return LOCAL if self.public else self.host

    @property
    def services(self) -> tuple[str, ...]:
        """This stack's services, in start order."""
        db = ("postgres",) if self.db == "postgres" else ()
        gateway = (S3_GATEWAY,) if self.public else ()
        return db + SERVICES[:1] + gateway + SERVICES[1:]

    @property
    def s3_url(self) -> str:
        """S3 as the stack's own servers reach it (on loopback)."""
        return f"http://{self.local_host}:{self.ports.s3}"

    @property
    def s3_public_url(self) -> str:
        """S3 on the listen address (the gateway beyond loopback; signed requests only)."""
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    @classmethod
    def at(
        cls,
        run_dir: Path,
        db: str | None = None,
        listen: str | None = None,
        auth: bool | None = None,
    ) -> Stack:
        """The stack of a run directory, on the ports, database, address and authentication
        it was started with (defaults if none; `db`, `listen`, `auth` choose others)."""
        try:
            state = json.loads((Path(run_dir) / "stack.json").read_text())
        except (OSError, ValueError):
            state = {}
        db = db or state.get("db", "sqlite")
        if db not in DATABASES:
            raise StackError(f"--db {db}: the stack keeps its data in {' or '.join(DATABASES)}")
        host = listen or state.get("host", LOCAL)
        check_listen(host)
        auth = bool(state.get("auth", False)) if auth is None else auth
        ports = Ports(**state.get("ports", {}))
        # the heartbeat its automation expects: what `stack env` must tell clients to send
        heartbeat_s = int(state.get("heartbeat_s", HEARTBEAT_S))
        return cls(Path(run_dir), ports=ports, db=db, host=host, auth=auth, heartbeat_s=heartbeat_s)

    def client_env(self) -> dict[str, str]:
        """What a client (the CLI, a test, a worker) needs: no S3 credentials, no secrets. Its
        flow runs send heartbeats as often as the crash automation expects them."""
        urls = {"PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_url}
        return urls | heartbeat_env(self.heartbeat_s)

    def auth_env(self, user: str = "worker") -> dict[str, str]:
        """The credentials a client of this stack sends (none without auth): Prefect's auth
        string and one MLflow user's (`worker` writes runs, `reader` only looks, `admin`)."""
        if not self.auth:
            return {}
        auth = auth_settings()
        name, password = {"worker": auth.worker, "reader": auth.reader, "admin": auth.admin}[user]
        return {
            PREFECT_AUTH_VAR: auth.prefect,
            MLFLOW_USER_VAR: name,
            MLFLOW_PASSWORD_VAR: password,
        }

    def worker_env(self) -> dict[str, str]:
        """Everything a worker on another machine needs (`stack env --for-worker`): the URLs on
        the listen address, the heartbeat, the worker's credentials; nothing of S3 (its large
        artifacts too go through MLflow's proxy, not presigned S3 URLs)."""
        if not self.public:
            raise StackError(
                f"the stack listens on {self.host} only: no other machine reaches it; start it "
                "with `agegender stack up --listen ADDR` (this machine's address), auth configured"
            )
        # DEFAULTS: telemetry off, as for every process the project starts
        return DEFAULTS | self.client_env() | self.auth_env("worker") | PROXIED_ARTIFACTS

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
            "db": self.db,
            "host": self.host,
            "auth": self.auth,
            "heartbeat_s": self.heartbeat_s,
            "ports": self.ports.__dict__,
            "urls": self.client_env() | {"S3": self.s3_public_url},
        }
        self._state_file().write_text(json.dumps(state, indent=1))

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _command(self, name: str, creds: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        # no secret reaches a service that does not need it (each gets its own below)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in SECRETS}
        apply_defaults(env)  # telemetry off, unless the user turned it on
        if name == "s3":
            argv = [
                str(BIN / "weed"),
                "mini",
                f"-dir={self.run_dir / 's3'}",
                f"-ip={self.local_host}",
                f"-ip.bind={self.local_host}",
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
        if name == S3_GATEWAY:  # S3 alone on the listen address (see deployments/s3proxy.py)
            port = str(self.ports.s3)
            argv = [sys.executable, "-m", "deployments.s3proxy", self.host, port, LOCAL, port]
            return argv, env
        if name == "mlflow":
            hosts = ",".join(f"{h},{h}:*" for h in dict.fromkeys(["localhost", LOCAL, self.host]))
            argv = [
                str(BIN / "mlflow"),
                "server",
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
                # also the address of the presigned URLs it hands clients for large artifacts
                # (MLflow 3's multipart transfers): the one other machines reach
                "MLFLOW_S3_ENDPOINT_URL": self.s3_public_url,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # in the environment, not on the command line: the URL may hold a password
                "MLFLOW_BACKEND_STORE_URI": self._database_url("mlflow"),
            }
            if self.auth:
                argv += ["--app-name", "basic-auth"]
                extra |= self._mlflow_auth_env()
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
            prefect_env = {
                "PREFECT_HOME": str(self.run_dir / "prefect"),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self._database_url("prefect"),
                # the UI's own API address: Prefect derives it from its default port (4200),
                # not from --port, so on any other port the UI could reach no API
                "PREFECT_SERVER_UI_API_URL": self.prefect_api,
            }
            if self.auth:  # every API call but its health check needs this "user:password"
                prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = auth_settings().prefect
            return argv, env | prefect_env
        if name == "worker":
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--type", "process"]
            home = {"PREFECT_HOME": str(self.run_dir / "worker")}
            return argv, env | self.client_env() | self.auth_env("worker") | home
        if name == "postgres":
            data = self._pg_data()
            argv = [
                str(pg_bin() / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.ports.postgres),
                "-k",
                str(data),  # its Unix socket: only the stack's own set-up uses it
                "-c",
                f"listen_addresses={self.local_host}",
            ]
            return argv, {"PATH": env.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        raise ValueError(f"unknown service {name!r}; the stack has {', '.join(self.services)}")

    # --- PostgreSQL (--db postgres) ---------------------------------------------------------

    def _pg_data(self) -> Path:
        return self.run_dir / "postgres" / "data"

    def _pg_password_file(self) -> Path:
        return self.run_dir / "postgres-password"

    def _pg_password(self) -> str:
        """The role's password: made once per stack, kept in the run dir (0600), never shown."""
        return _own_secret(self._pg_password_file())

    # --- MLflow's basic-auth app (auth) ------------------------------------------------------

    def _mlflow_auth_env(self) -> dict[str, str]:
        """The auth app's settings: its config file (0600: its database URL may hold the
        PostgreSQL password), the admin from `Auth` (MLflow creates it on the first start
        only), a CSRF key of this stack's own, and workspaces, whose creation right (a grant of
        USE) is what keeps the reader from creating experiments."""
        auth = auth_settings()
        config = self.run_dir / "mlflow" / "basic_auth.ini"
        config.parent.mkdir(parents=True, exist_ok=True)
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self._database_url('mlflow_auth')}\n"
            f"admin_username = {auth.admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = true\n"
        )
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            MLFLOW_ADMIN_USER_VAR: auth.admin[0],
            MLFLOW_ADMIN_PASSWORD_VAR: auth.admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _own_secret(self.run_dir / "mlflow-secret-key"),
            "MLFLOW_ENABLE_WORKSPACES": "true",
        }

    def _mlflow_users(self) -> str:
        """The worker and reader users (`deployments/mlflow_users.py`)."""
        auth = auth_settings()
        try:
            return ensure_users(self.mlflow_url, auth.admin, auth.worker, auth.reader)
        except UsersError as exc:
            raise StackError(str(exc)) from None

    def _database_url(self, database: str) -> str:
        """Where Prefect (asyncpg) or MLflow (psycopg2: SQLAlchemy 2.1 maps a bare
        `postgresql://` to psycopg 3) keep their data."""
        if self.db == "sqlite":
            if database.startswith("mlflow"):
                return f"sqlite:///{self.run_dir / 'mlflow' / (database + '.db')}"
            return f"sqlite+aiosqlite:///{self.run_dir / 'prefect' / 'prefect.db'}"
        driver = "postgresql+asyncpg" if database == "prefect" else "postgresql+psycopg2"
        where = f"{self.local_host}:{self.ports.postgres}/{database}"
        return f"{driver}://{PG_ROLE}:{self._pg_password()}@{where}"

    def _pg_init(self) -> None:
        """A fresh data folder (initdb) unless there is one: local admin by peer over the
        data folder's socket, TCP on 127.0.0.1 only with scram-sha-256 passwords."""
        initdb = pg_bin() / "initdb"  # first: a missing install is the clearest error
        data = self._pg_data()
        if (data / "PG_VERSION").is_file():
            return
        user = pg_user()
        data.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(data.parent, 0o700)
        if user is not None:
            os.chown(data.parent, user.pw_uid, user.pw_gid)
            reach = _as_pg_user(["test", "-w", str(data.parent)], cwd=Path("/"))
            if reach.returncode != 0:
                raise StackError(
                    f"postgres: PostgreSQL runs as the `{user.pw_name}` user (it refuses root), "
                    f"which cannot reach {data.parent}; make every folder above it searchable "
                    "by that user (chmod o+x) or choose another --run-dir"
                )
        res = _as_pg_user(
            [
                str(initdb),
                "-D",
                str(data),
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            cwd=data.parent,
        )
        if res.returncode != 0:
            raise StackError(f"postgres: initdb {data} failed:\n{res.stdout[-2000:]}")

    def _pg_setup(self) -> None:
        """The role (with this stack's password) and the `prefect` and `mlflow` databases."""
        password = self._pg_password()
        sql = [
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"'{PG_ROLE}') THEN CREATE ROLE {PG_ROLE} LOGIN; END IF; END$$;",
            f"ALTER ROLE {PG_ROLE} WITH LOGIN PASSWORD '{password}';",
        ]
        for name in PG_DATABASES:
            sql.append(
                f"SELECT 'CREATE DATABASE {name} OWNER {PG_ROLE}' WHERE NOT EXISTS "
                f"(SELECT FROM pg_database WHERE datname = '{name}')\\gexec"
            )
        res = _as_pg_user(
            [*self.psql_admin(), "-d", "postgres"], cwd=self._pg_data(), stdin="\n".join(sql)
        )
        if res.returncode != 0:
            said = res.stderr.replace(password, "***")[-2000:]  # psql may echo the statement
            raise StackError(
                f"postgres: making the role and databases failed (see {self.log('postgres')}):"
                f"\n{said}"
            )

    def psql_admin(self) -> list[str]:
        """psql as the server's own superuser, over the data folder's socket (peer auth)."""
        data = self._pg_data()
        return [
            str(pg_bin() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(data),
            "-p",
            str(self.ports.postgres),
        ]

    def start(self, name: str, creds: Mapping[str, str] | None = None) -> int:
        """Start one service in its own process group and wait until it is healthy."""
        creds = creds if creds is not None else credentials()
        pids = self._pids()
        if name in pids and alive(pids[name]):
            raise StackError(
                f"{name} already runs (pid {pids[name]}); `agegender stack down` first"
            )
        port = getattr(self.ports, "s3" if name == S3_GATEWAY else name, None)
        where = self.host if name in ("mlflow", "prefect", S3_GATEWAY) else self.local_host
        if port is not None and port_open(where, port):
            raise StackError(
                f"{name}: port {where}:{port} is already in use (another stack? "
                "`agegender stack down`, or choose other ports)"
            )
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        user = None
        if name == "postgres":
            self._pg_init()
            user = pg_user()
        else:
            (self.run_dir / name).mkdir(parents=True, exist_ok=True)
        argv, env = self._command(name, creds)
        as_user: dict[str, Any] = {}
        if user is not None:  # root: the server runs as the package's `postgres` user
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with self.log(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self._pg_data() if name == "postgres" else REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **as_user,
            )
        self._save_pids(pids | {name: proc.pid})
        try:
            self._wait_healthy(name, creds, proc)
            if name == "postgres":
                self._pg_setup()
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
            if creds:
                return s3_ready(self.s3_url, creds)
            return port_open(self.local_host, self.ports.s3)
        if name == S3_GATEWAY:
            if creds:
                return s3_ready(self.s3_public_url, creds)
            return port_open(self.host, self.ports.s3)
        if name == "mlflow":
            return health(self.mlflow_url, timeout=2.0) is None
        if name == "prefect":
            return health(self.prefect_api, timeout=2.0) is None
        if name == "postgres":
            return pg_ready(self.local_host, self.ports.postgres)
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
            # PostgreSQL: SIGINT to its server process alone (its fast shutdown; signals to its
            # own children would disturb it); the others: their whole process group
            steps: list[tuple[Callable[[int, int], None], int]] = (
                [(os.kill, signal.SIGINT)]
                if name == "postgres"
                else [(os.killpg, signal.SIGTERM), (os.killpg, signal.SIGINT)]
            )
            for send, sig in [*steps, (os.killpg, signal.SIGKILL)]:
                try:
                    send(pid, sig)
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

    def check_auth(self) -> None:
        """Before anything starts: servers reachable from other machines ask who calls."""
        check_listen(self.host)
        if self.public and not self.auth:
            raise StackError(
                f"--listen {self.host} opens the servers to other machines, and no "
                f"authentication is configured: set {', '.join(AUTH_SECRET_VARS)} in the "
                "environment or in .env (see .env.example); nothing was started"
            )
        if self.auth:
            auth_settings()  # all of them, valid: else an error naming the ones to set

    def up(self, progress: Callable[[str], None] = print, worker: bool = True) -> dict[str, str]:
        """Every service, the pools and deployments; `worker=False`: no worker here, the pools'
        workers run on other machines."""
        self.check_auth()
        creds = credentials()
        for name in self.services[:-1]:  # the worker comes after the pools and deployments
            started = time.monotonic()
            self.start(name, creds)
            progress(f"{name} healthy in {time.monotonic() - started:.1f} s")
            if name == "mlflow" and self.auth:
                progress(self._mlflow_users())
        ensure_bucket(self.s3_url, creds, self.bucket)
        progress(f"bucket s3://{self.bucket} ready")
        started = time.monotonic()
        self.setup(progress=progress)
        progress(f"work pools, limits and deployments in {time.monotonic() - started:.1f} s")
        if worker:
            self.start("worker", creds)
            progress("worker online on pool 'local'")
        return self.client_env()

    def setup(self, gpu_slots: int | None = None, progress: Callable[[str], None] = print) -> None:
        """Work pools, the GPU concurrency limit (one fold per GPU of this machine, at least
        one) and the deployments of prefect.yaml."""
        gpu_slots = gpu_slots or max(count_gpus(), 1)
        (self.run_dir / "worker").mkdir(parents=True, exist_ok=True)
        home = {"PREFECT_HOME": str(self.run_dir / "worker")}
        env = os.environ | self.client_env() | self.auth_env("worker") | home
        env.setdefault("AGEGENDER_WORKER_IMAGE", "agegender-worker:latest")
        for var in (MLFLOW_USER_VAR, MLFLOW_PASSWORD_VAR):  # the GPU containers' login, if any
            env.setdefault(var, "")
        env["AGEGENDER_HOME"] = str(REPO)  # where the local pool's flows run
        for pool, kind in POOLS.items():
            progress(ensure_pool(self.prefect_api, pool, kind))
        _prefect(
            ["global-concurrency-limit", "create", GPU_LIMIT, "--limit", str(gpu_slots)],
            env,
            ok_if="already exists",
        )
        resumed = self._resumed_schedules()
        _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)], env)
        self._resume_schedules(resumed)
        ensure_zombie_automation(self.prefect_api, self.heartbeat_s)

    def _resumed_schedules(self) -> set[tuple[str, str]]:
        """(deployment, schedule) pairs the user turned on: a second `stack up` redeploys
        prefect.yaml, whose schedules start paused, and must not turn them off again."""
        return {
            (s["deployment"], s["schedule"]) for s in self.schedules(check=False) if s["active"]
        }

    def _resume_schedules(self, keep: set[tuple[str, str]]) -> None:
        for s in self.schedules(check=False):
            if (s["deployment"], s["schedule"]) in keep and not s["active"]:
                _api(
                    self.prefect_api,
                    "PATCH",
                    f"/deployments/{s['deployment_id']}/schedules/{s['schedule_id']}",
                    {"active": True},
                )

    def schedules(self, check: bool = True) -> list[dict[str, Any]]:
        """Every deployment schedule: on or paused, its next date, and (`check`) whether the
        parameters it runs with name paths that exist on this machine."""
        flows = {f["id"]: f["name"] for f in _api(self.prefect_api, "POST", "/flows/filter", {})}
        out: list[dict[str, Any]] = []
        for d in _api(self.prefect_api, "POST", "/deployments/filter", {}):
            name = f"{flows.get(d['flow_id'], '?')}/{d['name']}"
            for s in d.get("schedules") or []:
                item: dict[str, Any] = {
                    "deployment": name,
                    "deployment_id": d["id"],
                    "schedule_id": s["id"],
                    "schedule": describe(s["schedule"]),
                    "active": bool(s.get("active")) and not d.get("paused"),
                    "resume": f"prefect deployment schedule resume {name} {s['id']}",
                }
                if check:
                    params = (d.get("parameters") or {}) | (s.get("parameters") or {})
                    item["next_run"] = next_date(s["schedule"])
                    item["parameters"] = check_parameters(params)
                    item["resolves"] = all(c["ok"] for c in item["parameters"])
                out.append(item)
        return out

    def down(self) -> list[str]:
        """Stop every service this run directory started, worker first."""
        return [n for n in reversed(self.services) if self.stop(n)]

    def status(self) -> dict[str, Any]:
        pids = self._pids()
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "db": self.db,
            "listen": self.host,
            "auth": self.auth,  # whether the servers ask for credentials (never the credentials)
            "services": {},
        }
        urls = {"s3": self.s3_url, "mlflow": self.mlflow_url, "prefect": self.prefect_api}
        urls[S3_GATEWAY] = self.s3_public_url
        urls["postgres"] = f"postgresql://{self.local_host}:{self.ports.postgres}"  # no password
        for name in self.services:
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
            out["schedules"] = self.schedules()
            out["crash_detection"] = crash_detection(self.prefect_api)
            out["last_runs"] = [
                {"name": r["name"], "state": r.get("state_type"), "start": r.get("start_time")}
                for r in runs
            ]
        return out


# --- helpers ---------------------------------------------------------------------------------


def env_values(keys: tuple[str, ...], env_file: Path = REPO / ".env") -> dict[str, str]:
    """Each of `keys` set (not empty) in the environment, else in `.env` (KEY=VALUE lines)."""
    values = {k: os.environ[k] for k in keys if os.environ.get(k)}
    if len(values) < len(keys) and env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.strip().removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip().strip("'\"")
            if sep and key in keys and key not in values and value:
                values[key] = value
    return values


def auth_configured(env_file: Path = REPO / ".env") -> bool:
    """Any of the servers' passwords set: `stack up` then turns authentication on."""
    return bool(env_values(AUTH_SECRET_VARS, env_file))


def auth_settings(env_file: Path = REPO / ".env") -> Auth:
    """The servers' credentials from the environment, else `.env`; never defaults for the
    passwords. Missing or unusable ones are one error naming each variable."""
    values = env_values(AUTH_VARS, env_file)
    problems = [f"{k} is not set" for k in AUTH_SECRET_VARS if k not in values]
    prefect = values.get(PREFECT_AUTH_VAR, "")
    user, _, password = prefect.partition(":")
    if prefect and not (user and password):
        problems.append(f"{PREFECT_AUTH_VAR} must be user:password")
    names = {
        "admin": (values.get(MLFLOW_ADMIN_USER_VAR, "admin"), MLFLOW_ADMIN_PASSWORD_VAR),
        "worker": (values.get(WORKER_USER_VAR, "worker"), WORKER_PASSWORD_VAR),
        "reader": (values.get(READER_USER_VAR, "reader"), READER_PASSWORD_VAR),
    }
    for _name, var in names.values():
        if var in values and len(values[var]) < MLFLOW_MIN_PASSWORD:
            problems.append(
                f"{var} is shorter than {MLFLOW_MIN_PASSWORD} characters (MLflow's rule)"
            )
    if len({n for n, _ in names.values()}) < len(names):
        problems.append(
            f"{MLFLOW_ADMIN_USER_VAR}, {WORKER_USER_VAR} and {READER_USER_VAR} must differ"
        )
    if problems:
        raise StackError(
            "authentication: " + "; ".join(problems) + " (set them in the environment or in "
            f"{env_file}; see .env.example)"
        )
    pair = {who: (n, values[var]) for who, (n, var) in names.items()}
    return Auth(prefect, pair["admin"], pair["worker"], pair["reader"])


def _own_secret(path: Path) -> str:
    """A random secret of the stack's own (made once, kept in the run dir with mode 0600)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    return path.read_text().strip()


def credentials(env_file: Path = REPO / ".env") -> dict[str, str]:
    """S3 credentials from the environment, else from `.env` (KEY=VALUE lines); never defaults."""
    values = env_values(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), env_file)
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


def pool_template(kind: str) -> dict[str, Any]:
    """The default base job template of the worker type's own package: prefect-docker's for
    `docker` (Prefect's bundled copy lacks `container_create_kwargs`), Prefect's for `process`."""
    if kind == "docker":
        try:
            from prefect_docker.worker import DockerWorker
        except ImportError:
            raise StackError(
                "the docker work pool needs prefect-docker's job template: "
                "`pip install prefect-docker` (a dependency of this project: `make venv`)"
            ) from None
        template: dict[str, Any] = DockerWorker.get_default_base_job_template()
    elif kind == "process":
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
    else:
        raise StackError(f"no work pool template for type {kind!r} (known: process, docker)")
    copy: dict[str, Any] = json.loads(json.dumps(template))
    return copy


def pool_problem(pool: Mapping[str, Any], kind: str) -> str | None:
    """Why an existing pool cannot run this project's deployments (None: it can)."""
    name = pool.get("name")
    if pool.get("type") != kind:
        return (
            f"work pool {name!r} is a {pool.get('type')} pool, the stack needs a {kind} pool; "
            f"delete it (`prefect work-pool delete {name}`) and run `agegender stack up` again"
        )
    template = pool.get("base_job_template") or {}
    properties = template.get("variables", {}).get("properties", {})
    job = template.get("job_configuration", {})
    lost = [v for v in POOL_VARIABLES.get(kind, ()) if v not in properties or v not in job]
    if lost:
        return (
            f"work pool {name!r} has a base job template without {', '.join(lost)}: the "
            "deployments' job variables (GPU device requests, shm_size, volumes) would be "
            f"dropped; give it prefect-docker's template (`prefect work-pool "
            f"get-default-base-job-template --type {kind} --file t.json` with prefect-docker "
            f"installed, then `prefect work-pool update {name} --base-job-template t.json`) or "
            f"delete it (`prefect work-pool delete {name}`) and run `agegender stack up` again"
        )
    return None


def ensure_pool(api: str, name: str, kind: str) -> str:
    """Create the work pool from its worker's own template; a pool that exists is never
    overwritten (it may be the user's), only checked: one that cannot carry the job variables
    is an error naming the pool and the fix. Returns what was done, for the user."""
    existing = _api(api, "GET", f"/work_pools/{name}", missing_ok=True)
    if existing is None:
        body = {"name": name, "type": kind, "base_job_template": pool_template(kind)}
        _api(api, "POST", "/work_pools/", body)
        return f"work pool {name!r} ({kind}) created from its worker's default job template"
    problem = pool_problem(existing, kind)
    if problem:
        raise StackError(f"Prefect API at {api}: {problem}")
    return f"work pool {name!r} ({kind}) exists: kept as it is (checked: its template fits)"


def pg_bin() -> Path:
    """The PostgreSQL server programs: $AGEGENDER_PG_BIN, else the newest of Debian's."""
    given = os.environ.get("AGEGENDER_PG_BIN")
    found = (
        [Path(given)]
        if given
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for path in found:
        if all((path / exe).is_file() for exe in ("initdb", "postgres", "psql", "pg_isready")):
            return path
    where = given or "/usr/lib/postgresql/*/bin"
    raise StackError(
        f"--db postgres: no PostgreSQL server programs (initdb, postgres, psql, pg_isready) "
        f"in {where}; install Debian's `postgresql` package (`sudo apt-get install "
        "postgresql`), set AGEGENDER_PG_BIN to their folder, or use --db sqlite"
    )


def pg_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when we are root (it refuses root); None: ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "--db postgres as root: PostgreSQL refuses to run as root and the `postgres` user "
            "(made by Debian's `postgresql` package) does not exist; install the package"
        ) from None


def _as_pg_user(
    argv: list[str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as the user the server runs as."""
    user = pg_user()
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        timeout=300,
        **as_user,
    )


def pg_ready(host: str, port: int) -> bool:
    try:
        res = subprocess.run(
            [str(pg_bin() / "pg_isready"), "-q", "-h", host, "-p", str(port), "-t", "5"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


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


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _api(base: str, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
    """One Prefect REST call; `missing_ok`: None for a 404 instead of an error."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    auth = env_values((PREFECT_AUTH_VAR,)).get(PREFECT_AUTH_VAR)
    if auth:  # the stack's own (`Auth`): a server without auth ignores it
        headers |= basic_auth(auth)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        if missing_ok and exc.code == 404:
            return None
        if exc.code == 401:
            fix = "is wrong" if auth else "is not set"
            raise StackError(
                f"Prefect API at {base} asks for credentials (HTTP 401) and {PREFECT_AUTH_VAR} "
                f"{fix}; set it (environment or .env) to the server's user:password"
            ) from None
        raise StackError(f"Prefect API at {base}: {method} {path} failed ({exc})") from None
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
