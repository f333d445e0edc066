"""Work pools: created from their worker's own job template, an existing one checked, never
overwritten (the rendering through a live server's pool is in test_stack.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import prefect

from deployments.pools import pool_problem, pool_template


def bundled_docker_template() -> dict[str, Any]:
    """The docker template Prefect itself bundles: what `prefect work-pool create --type docker`
    takes when prefect-docker is not installed."""
    views = Path(prefect.__file__).parent / "server/api/collections_data/views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for collection in metadata.values():
        for worker in collection.values():
            if worker.get("type") == "docker":
                template: dict[str, Any] = worker["default_base_job_configuration"]
                return template
    raise AssertionError("Prefect bundles no docker worker template")


def test_the_gpu_pool_template_is_prefect_dockers_own() -> None:
    template = pool_template("docker")
    assert "container_create_kwargs" in template["variables"]["properties"]
    assert template["job_configuration"]["container_create_kwargs"] == (
        "{{ container_create_kwargs }}"
    )
    gpu = {"name": "gpu", "type": "docker", "base_job_template": template}
    assert pool_problem(gpu, "docker") is None
    local = {"name": "local", "type": "process", "base_job_template": pool_template("process")}
    assert pool_problem(local, "process") is None


def test_a_pool_that_would_drop_the_gpus_is_a_clear_error() -> None:
    pool = {"name": "gpu", "type": "docker", "base_job_template": bundled_docker_template()}
    problem = pool_problem(pool, "docker")
    assert problem is not None
    assert problem.startswith(
        "work pool 'gpu' has a base job template without container_create_kwargs:"
    )
    assert "prefect work-pool update gpu --base-job-template" in problem
    assert "prefect work-pool delete gpu" in problem
    wrong = {"name": "gpu", "type": "process", "base_job_template": pool_template("process")}
    assert pool_problem(wrong, "docker") == (
        "work pool 'gpu' is a process pool, the stack needs a docker pool; delete it "
        "(`prefect work-pool delete gpu`) and run `agegender stack up` again"
    )
