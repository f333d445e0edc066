"""What `agegender stack up` makes on its Prefect server once the servers answer: the work pools,
the GPU concurrency limit, the deployments of prefect.yaml (keeping the schedules the user
turned on) and the crash-detection automation. Each step leaves what exists as it is."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from deployments import schedules
from deployments.automations import ensure_zombie_automation
from deployments.commands import BIN
from deployments.pools import POOLS, ensure_pool
from deployments.prefect_api import PrefectApi
from deployments.services import (
    GPU_LIMIT,
    MLFLOW_PASSWORD_VAR,
    MLFLOW_USER_VAR,
    REPO,
    StackError,
)

PREFECT_FILE = Path("deployments") / "prefect.yaml"  # in the checkout (AGEGENDER_HOME)
# What prefect.yaml reads (`{{ $VAR }}`) when whoever deploys sets nothing: the GPU containers'
# image, their MLflow login (none), and where they find the stack (AGEGENDER_JOB_*: compose's
# network and service names, the host's /data).
DEPLOY_DEFAULTS = {
    "AGEGENDER_WORKER_IMAGE": "agegender-worker:latest",
    MLFLOW_USER_VAR: "",
    MLFLOW_PASSWORD_VAR: "",
    "AGEGENDER_JOB_NETWORK": "agegender_default",
    "AGEGENDER_JOB_MLFLOW_URI": "http://mlflow:5000",
    "AGEGENDER_JOB_DATA_DIR": "/data",
}


def deploy_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with every variable prefect.yaml reads filled (unset or empty: the default)."""
    return dict(env) | {k: env.get(k) or v for k, v in DEPLOY_DEFAULTS.items()}


def prefect_cli(args: list[str], env: Mapping[str, str], ok_if: str | None = None) -> None:
    """`prefect ARGS` from the checkout (AGEGENDER_HOME); one StackError with its output."""
    res = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=dict(env),
        cwd=env.get("AGEGENDER_HOME") or REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and not (ok_if and ok_if in (res.stdout + res.stderr)):
        raise StackError(f"`prefect {' '.join(args)}` failed:\n{(res.stdout + res.stderr)[-2000:]}")


def provision(
    api: PrefectApi,
    env: Mapping[str, str],
    gpu_slots: int,
    heartbeat_s: int,
    progress: Callable[[str], None],
) -> None:
    """`env`: what Prefect's CLI deploys with (the server's URL and credentials, the job
    variables prefect.yaml reads; AGEGENDER_HOME: the checkout holding prefect.yaml)."""
    env = deploy_env(env)
    for pool, kind in POOLS.items():
        progress(ensure_pool(api, pool, kind))
    prefect_cli(
        ["global-concurrency-limit", "create", GPU_LIMIT, "--limit", str(gpu_slots)],
        env,
        ok_if="already exists",
    )
    resumed = schedules.active(api)
    prefect_cli(["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)], env)
    schedules.resume(api, resumed)
    ensure_zombie_automation(api, heartbeat_s)
