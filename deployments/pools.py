"""The stack's work pools: made from their worker type's own job template, never overwritten,
checked that they can carry the deployments' job variables."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from typing import Any

from deployments.prefect_api import PrefectApi
from deployments.services import StackError

POOLS = {"local": "process", "gpu": "docker"}
# What a pool's base job template must pass on, per pool type: the GPU deployment's device
# request and shm_size travel in `container_create_kwargs`, which Prefect's bundled docker
# template (used when prefect-docker is not installed) silently lacks.
POOL_VARIABLES = {"docker": ("container_create_kwargs", "volumes", "networks", "env", "image")}


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


def ensure_pool(api: PrefectApi, name: str, kind: str) -> str:
    """Create the work pool from its worker's own template; a pool that exists is never
    overwritten (it may be the user's), only checked: one that cannot carry the job variables
    is an error naming the pool and the fix. Returns what was done, for the user."""
    existing = api("GET", f"/work_pools/{name}", missing_ok=True)
    if existing is None:
        body = {"name": name, "type": kind, "base_job_template": pool_template(kind)}
        api("POST", "/work_pools/", body)
        return f"work pool {name!r} ({kind}) created from its worker's default job template"
    problem = pool_problem(existing, kind)
    if problem:
        raise StackError(f"Prefect API at {api.base}: {problem}")
    return f"work pool {name!r} ({kind}) exists: kept as it is (checked: its template fits)"
