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

`--listen ADDR` puts the Prefect server, the MLflow server and S3 on ADDR, for workers on other
machines, each through its front door (`relay`: body limits, and credentials checked before a
body is read); the servers themselves, SeaweedFS and PostgreSQL stay on 127.0.0.1. Beyond loopback
the servers must ask who calls (`Auth`, from the environment or `.env` only): Prefect's basic
auth string, MLflow's `basic-auth` app (an admin, a `worker` user that writes runs, a `reader`
that only looks), S3's signed requests.

Here the order and the checks; each service's command line is in `commands`, where it listens
in `layout`, its processes in `supervisor`, PostgreSQL's set-up in `postgres`, what the Prefect
server is given in `provision`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from deployments import postgres
from deployments.automations import HEARTBEAT_S, crash_detection
from deployments.commands import Command, command
from deployments.credentials import (
    AUTH_SECRET_VARS,
    Auth,
    credentials,
    prefect_auth,
)
from deployments.layout import (
    DATABASES,
    GATEWAYS,
    LOCAL,
    S3_GATEWAY,
    WORKER_NAME,
    Layout,
    Ports,
    check_listen,
    max_body,
)
from deployments.mlflow_users import UsersError, ensure_users
from deployments.pools import count_gpus
from deployments.prefect_api import PrefectApi
from deployments.provision import provision
from deployments.s3 import ensure_bucket, s3_ready
from deployments.schedules import schedules
from deployments.services import REPO, StackError, health, prefect_lost
from deployments.supervisor import (
    GROUP_STOP,
    PRIVATE_UMASK,
    Supervisor,
    alive,
    make_private,
    port_open,
)


@dataclass(frozen=True)
class Stack(Layout):
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
        state = Supervisor(Path(run_dir)).state()
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

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.run_dir)

    def log(self, name: str) -> Path:
        return self.supervisor.log(name)

    def make_private(self, walk: bool = True) -> int:
        """The run dir closed to other users (0700 folders, 0600 files: its databases hold
        the worker's MLflow password, and its secrets and logs are there), older ones too;
        PostgreSQL's group may pass through it when the server runs as its own user. How
        many were open to others. `walk=False`: the run dir itself only."""
        user = postgres.pg_user() if self.db == "postgres" else None
        return make_private(self.run_dir, user.pw_gid if user else None, walk)

    def save_state(self, pids: Mapping[str, int]) -> None:
        """stack.json: the PIDs and how this stack was started (what `Stack.at` reads back)."""
        about = {
            "db": self.db,
            "host": self.host,
            "auth": self.auth,
            "heartbeat_s": self.heartbeat_s,
            "ports": self.ports.__dict__,
            "urls": self.client_env() | {"S3": self.s3_public_url},
        }
        self.supervisor.save(pids, about)

    # --- credentials: read once by a command, passed on --------------------------------------

    def prefect(self, auth: Auth | None = None) -> PrefectApi:
        """Its Prefect API with the stack's auth string: `auth`'s, else read now (alone: a
        health check needs no more)."""
        if not self.auth:
            return PrefectApi(self.prefect_api)
        return PrefectApi(self.prefect_api, auth.prefect if auth else prefect_auth())

    def command(self, name: str, creds: Mapping[str, str], auth: Auth | None = None) -> Command:
        """Service `name`'s command line and environment, as `start` runs it."""
        return command(self, name, creds, self.read_auth(auth))

    # --- one service ------------------------------------------------------------------------

    def start(
        self, name: str, creds: Mapping[str, str] | None = None, auth: Auth | None = None
    ) -> int:
        """Start one service in its own process group and wait until it is healthy."""
        creds = creds if creds is not None else credentials()
        auth = self.read_auth(auth)
        pids = self.supervisor.pids()
        if name in pids and alive(pids[name]):
            raise StackError(
                f"{name} already runs (pid {pids[name]}); `agegender stack down` first"
            )
        where = self.addresses.get(name)
        if where is not None and port_open(where.host, where.port):
            raise StackError(
                f"{name}: port {where.host}:{where.port} is already in use (another stack? "
                "`agegender stack down`, or choose other ports)"
            )
        self.make_private(walk=False)  # `up` walked it once; servers start under umask 077
        user = None
        if name == "postgres":
            postgres.init(self.pg_data)
            user = postgres.pg_user()
        else:
            (self.run_dir / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        argv, env = self.command(name, creds, auth)
        cwd = self.pg_data if name == "postgres" else REPO
        # the worker's flow runs write the user's results with the user's umask (its own
        # folder here stays 0700)
        umask = -1 if name == "worker" else PRIVATE_UMASK
        launched = time.time()
        proc = self.supervisor.launch(name, argv, env, cwd, user, umask)
        self.save_state(pids | {name: proc.pid})
        api = self.prefect(auth)
        try:
            check = lambda: self.healthy(name, creds, api, since=launched)  # noqa: E731
            self.supervisor.wait_healthy(name, check, proc)
            if name == "postgres":
                password = self.pg_password()
                port = self.ports.postgres
                postgres.create_role_and_databases(self.pg_data, port, password, self.log(name))
        except BaseException:
            self.stop(name)
            raise
        return proc.pid

    def healthy(
        self,
        name: str,
        creds: Mapping[str, str] | None = None,
        api: PrefectApi | None = None,
        since: float | None = None,
    ) -> bool:
        """The service's health check (S3: a signed request with `creds`, else its port;
        Prefect: its health and its database; the worker: our own worker's process alive and
        its own entry online in its pool, asked through `api`, else with the auth string read
        now; `since`: that entry's heartbeat no older than this time, as a start needs)."""
        where = self.addresses.get(name)
        if where is None:  # the worker
            return self._worker_online(api or self.prefect(), since)
        if name in ("s3", S3_GATEWAY):
            return s3_ready(where.url, creds) if creds else port_open(where.host, where.port)
        if name == "postgres":
            return postgres.pg_ready(where.host, where.port)
        if name == "prefect":  # its /api, and its database (it answers /health without one)
            return prefect_lost(where.url, timeout=2.0) is None
        return health(where.url, timeout=2.0) is None  # MLflow's root

    def _worker_online(self, api: PrefectApi, since: float | None = None) -> bool:
        """Our worker (the PID we started) runs and its own entry is ONLINE: a dead worker's
        entry stays ONLINE until its heartbeat times out, and other workers may share the pool;
        `since` (a start): its last heartbeat came after this time, not a predecessor's."""
        pid = self.supervisor.pids().get("worker")
        if pid is None or not alive(pid):
            return False
        try:
            workers = api("POST", "/work_pools/local/workers/filter", {})
        except StackError:
            return False
        return any(
            w.get("name") == WORKER_NAME
            and w.get("status") == "ONLINE"
            and (since is None or _timestamp(w.get("last_heartbeat_time")) >= since)
            for w in workers
        )

    def stop(self, name: str, grace: float = 15.0) -> bool:
        """Stop exactly the process group this stack started for `name`."""
        pids = self.supervisor.pids()
        pid = pids.pop(name, None)
        ask = postgres.STOP if name == "postgres" else GROUP_STOP
        stopped = pid is not None and self.supervisor.stop(pid, grace, ask)
        self.save_state(pids)
        return stopped

    # --- the whole stack --------------------------------------------------------------------

    def check_auth(self) -> Auth | None:
        """Before anything starts: servers reachable from other machines ask who calls. The
        credentials, read once for the command (None without authentication)."""
        check_listen(self.host)
        if self.public and not self.auth:
            raise StackError(
                f"--listen {self.host} opens the servers to other machines, and no "
                f"authentication is configured: set {', '.join(AUTH_SECRET_VARS)} in the "
                "environment or in .env (see .env.example); nothing was started"
            )
        if self.public:  # the front doors' body limits, valid
            for server in GATEWAYS:
                max_body(server, os.environ)
        return self.read_auth()  # all of them, valid: else an error naming the ones to set

    def up(self, progress: Callable[[str], None] = print, worker: bool = True) -> dict[str, str]:
        """Every service, the pools and deployments; `worker=False`: no worker here, the pools'
        workers run on other machines."""
        auth = self.check_auth()
        creds = credentials()
        opened = self.make_private()  # a run dir of an older version: its modes fixed
        if opened:
            progress(f"{self.run_dir}: {opened} folders and files closed to other users")
        for name in self.services[:-1]:  # the worker comes after the pools and deployments
            started = time.monotonic()
            self.start(name, creds, auth)
            progress(f"{name} healthy in {time.monotonic() - started:.1f} s")
            if name == self.front("mlflow") and auth is not None:
                progress(self._mlflow_users(auth))
        ensure_bucket(self.s3_url, creds, self.bucket)
        progress(f"bucket s3://{self.bucket} ready")
        started = time.monotonic()
        self.setup(progress=progress, auth=auth)
        progress(f"work pools, limits and deployments in {time.monotonic() - started:.1f} s")
        if worker:
            self.start("worker", creds, auth)
            progress("worker online on pool 'local'")
        self.make_private()  # what `prefect deploy` wrote in the worker's folder
        return self.client_env()

    def front(self, server: str) -> str:
        """The service clients reach `server` through: its front door beyond loopback."""
        return GATEWAYS[server] if self.public else server

    def _mlflow_users(self, auth: Auth) -> str:
        """The worker and reader users (`deployments/mlflow_users.py`)."""
        try:
            return ensure_users(self.mlflow_url, auth.admin, auth.worker, auth.reader)
        except UsersError as exc:
            raise StackError(str(exc)) from None

    def setup(
        self,
        gpu_slots: int | None = None,
        progress: Callable[[str], None] = print,
        auth: Auth | None = None,
    ) -> None:
        """Work pools, the GPU concurrency limit (one fold per GPU of this machine, at least
        one) and the deployments of prefect.yaml."""
        gpu_slots = gpu_slots or max(count_gpus(), 1)
        auth = self.read_auth(auth)
        (self.run_dir / "worker").mkdir(mode=0o700, parents=True, exist_ok=True)
        home = {"PREFECT_HOME": str(self.run_dir / "worker")}
        env = os.environ | self.client_env() | self.auth_env("worker", auth) | home
        env["AGEGENDER_HOME"] = str(REPO)  # where the local pool's flows run
        provision(self.prefect(auth), env, gpu_slots, self.heartbeat_s, progress)

    def down(self) -> list[str]:
        """Stop every service this run directory started, worker first."""
        return [n for n in reversed(self.services) if self.stop(n)]

    def status(self) -> dict[str, Any]:
        """Each service's state, whatever else is down (the table is always there); what the
        Prefect server holds when it answers, else `prefect_error` says why not."""
        pids = self.supervisor.pids()
        api = self.prefect()  # the auth string read once for every call below
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "db": self.db,
            "listen": self.host,
            "auth": self.auth,  # whether the servers ask for credentials (never the credentials)
            "services": {},
        }
        for name in self.services:
            pid = pids.get(name)
            where = self.addresses.get(name)
            out["services"][name] = {
                "pid": pid,
                "running": bool(pid and alive(pid)),
                "healthy": self._checked(name, api),
                "url": where.url if where else "",
                "log": str(self.log(name)),
            }
        if not out["services"]["prefect"]["healthy"]:
            lost = prefect_lost(self.prefect_api)
            out["prefect_error"] = lost or f"Prefect API at {self.prefect_api}: unhealthy"
            return out
        try:
            out |= self._prefect_status(api)
        except StackError as exc:  # it went away meanwhile: the table above still stands
            out["prefect_error"] = str(exc)
        return out

    def _checked(self, name: str, api: PrefectApi) -> bool:
        """`healthy`, where a check that cannot run (no PostgreSQL install) means not healthy."""
        try:
            return self.healthy(name, api=api)
        except StackError:
            return False

    def _prefect_status(self, api: PrefectApi) -> dict[str, Any]:
        """What the Prefect server holds: pools, workers, deployments, schedules, last runs."""
        out: dict[str, Any] = {}
        out["pools"] = {
            p["name"]: {"type": p["type"], "status": p.get("status")}
            for p in api("POST", "/work_pools/filter", {})
        }
        out["workers"] = {
            pool: [w["name"] for w in api("POST", f"/work_pools/{pool}/workers/filter", {})]
            for pool in out["pools"]
        }
        out["deployments"] = [d["name"] for d in api("POST", "/deployments/filter", {})]
        body = {"sort": "START_TIME_DESC", "limit": 5}
        runs = api("POST", "/flow_runs/filter", body)
        out["schedules"] = schedules(api)
        out["crash_detection"] = crash_detection(api)
        out["last_runs"] = [
            {"name": r["name"], "state": r.get("state_type"), "start": r.get("start_time")}
            for r in runs
        ]
        return out


def _timestamp(iso: object) -> float:
    """Seconds since the epoch of a Prefect timestamp (0 when absent or unreadable)."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp() if iso else 0.0
    except ValueError:
        return 0.0
