"""What each service of the native stack runs: its command line and environment. A service gets
the secrets it needs and no others; telemetry is off unless the user turned it on.

To change how a server starts, change its function here; `deployments/stack.py` starts them in
order and waits for each one's health check."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from deployments import postgres
from deployments.credentials import (
    MLFLOW_ADMIN_PASSWORD_VAR,
    MLFLOW_ADMIN_USER_VAR,
    SECRETS,
    Auth,
    own_secret,
)
from deployments.layout import GATEWAYS, LOCAL, WORKER_NAME, Layout, max_body
from deployments.services import apply_defaults

BIN = Path(sys.executable).parent  # the programs of this environment: weed, mlflow, prefect

Command = tuple[list[str], dict[str, str]]


def _base_env() -> dict[str, str]:
    """This process's environment less every secret (each service gets its own below)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in SECRETS}
    apply_defaults(env)  # telemetry off, unless the user turned it on
    return env


def s3(stack: Layout, creds: Mapping[str, str], env: dict[str, str]) -> Command:
    """SeaweedFS's `weed mini` on loopback; the credentials become its admin identity."""
    ports = stack.ports
    argv = [
        str(BIN / "weed"),
        "mini",
        f"-dir={stack.run_dir / 's3'}",
        f"-ip={stack.local_host}",
        f"-ip.bind={stack.local_host}",
        f"-s3.port={ports.s3}",
        f"-master.port={ports.weed_master}",
        f"-volume.port={ports.weed_volume}",
        f"-filer.port={ports.weed_filer}",
        f"-admin.port={ports.weed_admin}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
    ]
    return argv, env | dict(creds)


def gateway(stack: Layout, service: str, env: dict[str, str]) -> Command:
    """A server's front door on the listen address (deployments/relay.py): its body limit,
    credentials checked before a body is read; S3's REST API alone."""
    server = stack.addresses[service]
    port, limit = str(server.port), str(max_body(service, os.environ))
    argv = ["-m", "deployments.relay", service, stack.host, port, server.host, port, limit]
    return [sys.executable, *argv], env


def mlflow(
    stack: Layout, creds: Mapping[str, str], auth: Auth | None, env: dict[str, str]
) -> Command:
    """The tracking server, artifacts proxied to S3 (clients need no S3 credentials)."""
    hosts = ",".join(f"{h},{h}:*" for h in dict.fromkeys(["localhost", LOCAL, stack.host]))
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--artifacts-destination",
        f"s3://{stack.bucket}/artifacts",
        "--host",
        stack.addresses["mlflow"].host,
        "--port",
        str(stack.ports.mlflow),
        "--workers",
        "1",
        "--allowed-hosts",
        hosts,
    ]
    extra = {
        # also the address of the presigned URLs it hands clients for large artifacts
        # (MLflow 3's multipart transfers): the one other machines reach
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_public_url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # in the environment, not on the command line: the URL may hold a password
        "MLFLOW_BACKEND_STORE_URI": stack.database_url("mlflow"),
    }
    if auth is not None:
        argv += ["--app-name", "basic-auth"]
        extra |= mlflow_auth_env(stack, auth)
    return argv, env | dict(creds) | extra


def mlflow_auth_env(stack: Layout, auth: Auth) -> dict[str, str]:
    """MLflow's basic-auth app: its config file (0600: its database URL may hold the
    PostgreSQL password), the admin from `Auth` (MLflow creates it on the first start
    only), a CSRF key of this stack's own, and workspaces, whose creation right (a grant of
    USE) is what keeps the reader from creating experiments."""
    config = stack.run_dir / "mlflow" / "basic_auth.ini"
    config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {stack.database_url('mlflow_auth')}\n"
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
        "MLFLOW_FLASK_SERVER_SECRET_KEY": own_secret(stack.run_dir / "mlflow-secret-key"),
        "MLFLOW_ENABLE_WORKSPACES": "true",
    }


def prefect(stack: Layout, auth: Auth | None, env: dict[str, str]) -> Command:
    """The Prefect server (API and UI)."""
    argv = [
        str(BIN / "prefect"),
        "server",
        "start",
        "--host",
        stack.addresses["prefect"].host,
        "--port",
        str(stack.ports.prefect),
    ]
    prefect_env = {
        "PREFECT_HOME": str(stack.run_dir / "prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": stack.database_url("prefect"),
        # the UI's own API address: Prefect derives it from its default port (4200),
        # not from --port, so on any other port the UI could reach no API
        "PREFECT_SERVER_UI_API_URL": stack.prefect_api,
    }
    if auth is not None:  # every API call but its health check needs this "user:password"
        prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = auth.prefect
    return argv, env | prefect_env


def worker(stack: Layout, auth: Auth | None, env: dict[str, str]) -> Command:
    """A process worker on the `local` pool, a client of the stack like any other, under a
    known name: the stack's health check reads that entry of the pool, not any worker's."""
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--type", "process"]
    argv += ["--name", WORKER_NAME]
    home = {"PREFECT_HOME": str(stack.run_dir / "worker")}
    return argv, env | stack.client_env() | stack.auth_env("worker", auth) | home


def command(stack: Layout, name: str, creds: Mapping[str, str], auth: Auth | None) -> Command:
    """Service `name`'s command line and environment; `auth` (None: no authentication) and
    the S3 `creds` as the command read them."""
    env = _base_env()
    if name == "s3":
        return s3(stack, creds, env)
    gateways = {g: s for s, g in GATEWAYS.items()}
    if name in gateways:
        return gateway(stack, gateways[name], env)
    if name == "mlflow":
        return mlflow(stack, creds, auth, env)
    if name == "prefect":
        return prefect(stack, auth, env)
    if name == "worker":
        return worker(stack, auth, env)
    if name == "postgres":
        path = env.get("PATH", "/usr/bin:/bin")
        return postgres.command(stack.pg_data, stack.ports.postgres, stack.local_host, path)
    raise ValueError(f"unknown service {name!r}; the stack has {', '.join(stack.services)}")
