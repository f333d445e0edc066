"""What every orchestration room shares about the servers: the environment defaults of their
clients, one health check, the GPU concurrency limit's name, the error a server's trouble
becomes (`StackError`).

Standard library only and importing nothing of ours, so `tasks`, `flows`, `tracking` and the
stack may all import it (the tasks package applies the defaults before Prefect is imported:
Prefect reads its settings once, at import). `python -m deployments.services CMD ...` runs a
command (`mlflow models serve`, `prefect ...`) with the same defaults.
"""

from __future__ import annotations

import base64
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import MutableMapping, Sequence
from pathlib import Path


class StackError(RuntimeError):
    """A service that cannot start, answer or be reached; the message names it and its log."""


REPO = Path(__file__).resolve().parents[1]  # the checkout: servers run in it, `.env` is there

GPU_LIMIT = "gpu-slots"  # global concurrency limit: folds at once per machine's GPUs

EPHEMERAL_STARTUP_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# Prefect's own 20 s is exceeded on a busy 2-core machine (the first command died of it)
EPHEMERAL_STARTUP_S = 600

# what every image and compose service must carry too (tests/test_docker.py checks them)
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
DEFAULTS = TELEMETRY_OFF | {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    EPHEMERAL_STARTUP_VAR: str(EPHEMERAL_STARTUP_S),
}


def apply_defaults(env: MutableMapping[str, str] = os.environ) -> None:
    """`DEFAULTS` where `env` (the process's own, or a child's) does not set them: a value the
    user set wins."""
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)


def health(url: str, timeout: float = 10.0, path: str = "health") -> str | None:
    """None when the server at `url` (MLflow's root, Prefect's `/api`) answers `url/path`
    with 200; else what went wrong ("HTTP 503 Service Unavailable", "[Errno 111] Connection
    refused", "timed out"), for an error that names the server. One request, no retries.
    (`path="ready"`: Prefect's readiness, which also asks its database.)"""
    probe = url.rstrip("/") + "/" + path
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status} {r.reason}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return str(exc) or type(exc).__name__


# how long a Prefect server may stay away (down, or up without its database) before a client
# waiting on it gives up with one line naming it: long enough for a busy machine's slow answer
PREFECT_LOST_S = 20.0
RECOVER = (
    "`agegender stack status` shows which service is down; `agegender stack down` then "
    "`agegender stack up` starts the stack again; then rerun this command (folds that finished "
    "are skipped, the others resume from their checkpoints)"
)


def prefect_lost(api: str, timeout: float = 5.0) -> str | None:
    """None while the Prefect server at `api` answers its health check and has its database
    (`/ready`); else one line naming what went away (the server, or its database: the stack's
    PostgreSQL) and what to run. Health and readiness need no credentials."""
    problem = health(api, timeout)
    if problem is not None:
        return f"Prefect API at {api} went away ({problem}); {RECOVER}"
    problem = health(api, timeout, path="ready")
    if problem is not None:
        return (
            f"Prefect API at {api} lost its database ({problem} from /ready: with `stack up "
            f"--db postgres`, the stack's PostgreSQL is down); {RECOVER}"
        )
    return None


# the client side of the servers' authentication (`agegender stack up --listen`): Prefect's own
# client setting and MLflow's own client variables, so that every tool reads the same ones
PREFECT_AUTH_VAR = "PREFECT_API_AUTH_STRING"  # "user:password"
MLFLOW_USER_VAR = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"


def basic_auth(user_pass: str) -> dict[str, str]:
    """The HTTP header of a "user:password" pair (Prefect's auth string, MLflow's users)."""
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def _status(url: str, headers: dict[str, str], timeout: float) -> int | str:
    """The HTTP status of one GET (or why there was none)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return str(exc) or type(exc).__name__


def refused(
    name: str, url: str, user_pass: str | None, variables: str, timeout: float
) -> str | None:
    """None unless the server (healthy: its health check needs no credentials) refuses a data
    request made with this client's credentials; then one line naming what to set."""
    if name == "MLflow":
        probe = url.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    else:
        probe = url.rstrip("/") + "/version"
    status = _status(probe, basic_auth(user_pass) if user_pass else {}, timeout)
    if status not in (401, 403):
        return None
    if user_pass:
        said = f"refused the credentials in {variables} (HTTP {status})"
        fix = f"set {variables} to the ones the server was started with"
    else:
        said = f"asks for credentials (HTTP {status}) and {variables} is not set"
        fix = f"set {variables}"
    return (
        f"{name} at {url} {said}; {fix} (on the stack's machine `agegender stack env "
        "--for-worker` prints them)"
    )


def mlflow_refused(uri: str, timeout: float = 10.0) -> str | None:
    """`refused` for an MLflow client: MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD."""
    user, password = os.environ.get(MLFLOW_USER_VAR), os.environ.get(MLFLOW_PASSWORD_VAR)
    creds = f"{user}:{password}" if user and password else None
    names = f"{MLFLOW_USER_VAR} / {MLFLOW_PASSWORD_VAR}"
    return refused("MLflow", uri, creds, names, timeout)


_MLFLOW_ANSWERED: set[tuple[str, str | None, str | None]] = set()


def mlflow_problem(uri: str, var: str = "MLFLOW_TRACKING_URI", timeout: float = 10.0) -> str | None:
    """None when MLflow at `uri` answers and takes this client's credentials, else one line
    naming the server, its problem and the setting to fix. Asked once per process, server and
    credentials: the command before its flow, then every `Tracker`, would probe again."""
    key = (uri, os.environ.get(MLFLOW_USER_VAR), os.environ.get(MLFLOW_PASSWORD_VAR))
    if key in _MLFLOW_ANSWERED:
        return None
    problem = health(uri, timeout)
    if problem is not None:
        return (
            f"MLflow at {uri} is unreachable ({problem}); is it running "
            f"(`agegender stack status`) and {var} right?"
        )
    refused = mlflow_refused(uri, timeout)
    if refused is None:
        _MLFLOW_ANSWERED.add(key)
    return refused


def prefect_refused(api: str, auth_string: str | None, timeout: float = 10.0) -> str | None:
    """`refused` for a Prefect client with its `api.auth_string` (PREFECT_API_AUTH_STRING,
    which Prefect also reads from `.env` and profiles: the caller passes the effective one)."""
    return refused("Prefect API", api, auth_string, PREFECT_AUTH_VAR, timeout)


def main(argv: Sequence[str]) -> None:
    """Run `argv` with the defaults (`make serve`: `mlflow models serve` imports none of ours)."""
    if not argv:
        sys.exit("usage: python -m deployments.services COMMAND [ARG ...]")
    apply_defaults()
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
