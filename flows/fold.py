"""One fold as its own flow, for scale-out: the suite runs it through the `train_fold`
deployment on a work pool, so any number of workers on any number of machines take folds.

The fold holds one slot of the global concurrency limit `gpu-slots` (created by the stack with
one slot per GPU) while it trains; a worker that dies loses its lease after `LEASE` seconds, so
its slot comes back. What is logged to MLflow is exactly what the in-process task logs.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prefect import flow, get_client, runtime
from prefect.concurrency.sync import concurrency

from agegender.train import select_device
from tasks.folds import FoldJob, set_slots, train_fold_task

GPU_LIMIT = "gpu-slots"
LEASE = 60.0  # the server accepts no shorter lease


@flow(name="train_fold", log_prints=True)
def train_fold_flow(job: FoldJob, device: str | None = None) -> dict[str, Any]:
    """`device`: what the deployment requires (`cuda` on the GPU pool: a container without a
    GPU fails at once instead of training on its CPU); None keeps the job's train.device."""
    train = job.config.get("train", {})
    if device is not None and not str(train.get("device", "auto")).startswith(device):
        train = train | {"device": device}  # (cuda:1 already is a cuda device)
        job = job.model_copy(update={"config": job.config | {"train": train}})
    select_device(str(train.get("device", "auto")))
    set_slots(1)
    _tag_process()
    with concurrency(GPU_LIMIT, occupy=1, lease_duration=LEASE):
        return train_fold_task(job)


def _tag_process() -> None:
    """Tag the flow run with where it runs, so a waiting suite on the same machine can tell a
    run whose process died (a killed worker) from one that is still training."""
    run_id = runtime.flow_run.id
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        tags = [*run.tags, f"host:{socket.gethostname()}", f"pid:{os.getpid()}"]
        client.update_flow_run(run_id, tags=tags)
