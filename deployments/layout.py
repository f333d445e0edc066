"""Where a stack's services live: its run dir, ports and listen address, every service's
address and URL (computed here once), where Prefect and MLflow keep their data, and what its
clients are told. Nothing here starts or asks anything."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from deployments import postgres
from deployments.automations import HEARTBEAT_S, heartbeat_env
from deployments.credentials import Auth, auth_settings, own_secret
from deployments.services import (
    DEFAULTS,
    MLFLOW_PASSWORD_VAR,
    MLFLOW_USER_VAR,
    PREFECT_AUTH_VAR,
    StackError,
)

SERVICES = ("s3", "mlflow", "prefect", "worker")
# the stack's own worker in its pool: its health is this entry's, not any worker's in the pool
WORKER_NAME = "agegender-stack-worker"
DATABASES = ("sqlite", "postgres")  # where Prefect and MLflow keep their data
LOCAL = "127.0.0.1"  # where what only the stack itself talks to listens (PostgreSQL, SeaweedFS)
S3_GATEWAY = "s3-gateway"  # S3 relayed to the --listen address (SeaweedFS itself stays local)
# beyond loopback every server listens on 127.0.0.1 behind its front door on the listen address
# (deployments/relay.py): a body limit, and credentials checked before a body is read
GATEWAYS = {"s3": S3_GATEWAY, "mlflow": "mlflow-gateway", "prefect": "prefect-gateway"}
# the largest request body each front door lets through, in MiB (the variable overrides it):
# S3's largest single PUT; MLflow's artifacts come through its server (PROXIED_ARTIFACTS), a
# model's weights in one PUT; Prefect's API takes JSON only
MAX_BODY_MB = {"s3": 5120, "mlflow": 512, "prefect": 32}


def max_body_var(service: str) -> str:
    return f"AGEGENDER_{service.upper()}_MAX_BODY_MB"


def max_body(service: str, environ: Mapping[str, str]) -> int:
    """The front door's body limit for `service`, in bytes, from `environ` or the default."""
    var = max_body_var(service)
    value = environ.get(var, "").strip() or str(MAX_BODY_MB[service])
    if not value.isdigit() or int(value) < 1:
        raise StackError(
            f"{var}={value!r}: expected a whole number of MiB, at least 1 "
            f"(default {MAX_BODY_MB[service]}); nothing was started"
        )
    return int(value) << 20


# MLflow 3 clients move artifacts over its multipart size straight to S3 (presigned URLs) when
# the server offers it; a worker elsewhere sends everything through the MLflow server instead
PROXIED_ARTIFACTS = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
}


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


class Address(NamedTuple):
    host: str
    port: int
    url: str  # what its clients use (no password in it)


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
class Layout:
    run_dir: Path
    ports: Ports = field(default_factory=Ports)
    host: str = LOCAL  # where Prefect, MLflow and S3 listen (`--listen`)
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
        servers = [(s, GATEWAYS[s]) if self.public else (s,) for s in SERVICES[:-1]]
        return db + sum(servers, ()) + SERVICES[-1:]

    @cached_property
    def addresses(self) -> dict[str, Address]:
        """Each service that listens: where (the servers on loopback, their front doors on
        the listen address, on the same ports; one and the same without `--listen`)."""
        local, ports = self.local_host, self.ports
        out = {"postgres": Address(local, ports.postgres, f"postgresql://{local}:{ports.postgres}")}
        for name, gateway in GATEWAYS.items():
            port, path = getattr(ports, name), "/api" if name == "prefect" else ""
            out[name] = Address(local, port, f"http://{local}:{port}{path}")
            out[gateway] = Address(self.host, port, f"http://{self.host}:{port}{path}")
        return out

    @property
    def s3_url(self) -> str:
        """S3 as the stack's own servers reach it (on loopback)."""
        return self.addresses["s3"].url

    @property
    def s3_public_url(self) -> str:
        """S3 on the listen address (the gateway beyond loopback; signed requests only)."""
        return self.addresses[S3_GATEWAY].url

    @property
    def mlflow_url(self) -> str:
        """MLflow as its clients reach it (through its front door beyond loopback)."""
        return self.addresses[GATEWAYS["mlflow"]].url

    @property
    def prefect_api(self) -> str:
        return self.addresses[GATEWAYS["prefect"]].url

    # --- where the data are -----------------------------------------------------------------

    @property
    def pg_data(self) -> Path:
        return self.run_dir / "postgres" / "data"

    def pg_password(self) -> str:
        """The role's password: made once per stack, kept in the run dir (0600), never shown."""
        return own_secret(self.run_dir / "postgres-password")

    def database_url(self, database: str) -> str:
        """Where Prefect (asyncpg) or MLflow (psycopg2: SQLAlchemy 2.1 maps a bare
        `postgresql://` to psycopg 3) keep their data."""
        if self.db == "sqlite":
            if database.startswith("mlflow"):
                return f"sqlite:///{self.run_dir / 'mlflow' / (database + '.db')}"
            return f"sqlite+aiosqlite:///{self.run_dir / 'prefect' / 'prefect.db'}"
        driver = "postgresql+asyncpg" if database == "prefect" else "postgresql+psycopg2"
        where = f"{self.local_host}:{self.ports.postgres}/{database}"
        return f"{driver}://{postgres.ROLE}:{self.pg_password()}@{where}"

    # --- what clients are told --------------------------------------------------------------

    def client_env(self) -> dict[str, str]:
        """What a client (the CLI, a test, a worker) needs: no S3 credentials, no secrets. Its
        flow runs send heartbeats as often as the crash automation expects them."""
        urls = {"PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_url}
        return urls | heartbeat_env(self.heartbeat_s)

    def read_auth(self, auth: Auth | None = None) -> Auth | None:
        """The servers' credentials (None: this stack asks for none): `auth`, the command's
        own reading, else read now."""
        return (auth or auth_settings()) if self.auth else None

    def auth_env(self, user: str = "worker", auth: Auth | None = None) -> dict[str, str]:
        """The credentials a client of this stack sends (none without auth): Prefect's auth
        string and one MLflow user's (`worker` writes runs, `reader` only looks, `admin`)."""
        auth = self.read_auth(auth)
        if auth is None:
            return {}
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
