"""What `agegender stack up` makes on its Prefect server once the servers answer: the work pools,
the GPU concurrency limit, the deployments of prefect.yaml (keeping the schedules the user
turned on) and the crash-detection automation. Each step leaves what exists as it is."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping

from deployments import schedules
from deployments.automations import ensure_zombie_automation
from deployments.commands import BIN
from deployments.pools import POOLS, ensure_pool
from deployments.prefect_api import PrefectApi
from deployments.services import GPU_LIMIT, REPO, StackError

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"


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


def provision(
    api: PrefectApi,
    env: Mapping[str, str],
    gpu_slots: int,
    heartbeat_s: int,
    progress: Callable[[str], None],
) -> None:
    """`env`: what Prefect's CLI deploys with (the server's URL and credentials, the job
    variables prefect.yaml reads)."""
    for pool, kind in POOLS.items():
        progress(ensure_pool(api, pool, kind))
    _prefect(
        ["global-concurrency-limit", "create", GPU_LIMIT, "--limit", str(gpu_slots)],
        env,
        ok_if="already exists",
    )
    resumed = schedules.active(api)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)], env)
    schedules.resume(api, resumed)
    ensure_zombie_automation(api, heartbeat_s)
