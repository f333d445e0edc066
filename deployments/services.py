"""What every orchestration room shares about the servers: the environment defaults of their
clients, one health check, the GPU concurrency limit's name.

Standard library only and importing nothing of ours, so `tasks`, `flows`, `tracking` and the
stack may all import it (the tasks package applies the defaults before Prefect is imported:
Prefect reads its settings once, at import). `python -m deployments.services CMD ...` runs a
command (`mlflow models serve`, `prefect ...`) with the same defaults.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import MutableMapping, Sequence

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


def health(url: str, timeout: float = 10.0) -> str | None:
    """None when the server at `url` (MLflow's root, Prefect's `/api`) answers `url/health`
    with 200; else what went wrong ("HTTP 503 Service Unavailable", "[Errno 111] Connection
    refused", "timed out"), for an error that names the server. One request, no retries."""
    probe = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status} {r.reason}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return str(exc) or type(exc).__name__


def main(argv: Sequence[str]) -> None:
    """Run `argv` with the defaults (`make serve`: `mlflow models serve` imports none of ours)."""
    if not argv:
        sys.exit("usage: python -m deployments.services COMMAND [ARG ...]")
    apply_defaults()
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
