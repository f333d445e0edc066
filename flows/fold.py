"""One fold as its own flow, for scale-out: the suite runs it through the `train_fold`
deployment on a work pool, so any number of workers on any number of machines take folds.

The fold holds one slot of the global concurrency limit `gpu-slots` (created by the stack with
one slot per GPU) while it trains; a worker that dies loses its lease after `LEASE` seconds, so
its slot comes back, and the server marks its flow run CRASHED once its heartbeats stop
(deployments/automations.py), so the waiting suite starts the fold again. What is logged to
MLflow is exactly what the in-process task logs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.concurrency.sync import concurrency

from agegender.train import select_device
from deployments.services import GPU_LIMIT
from tasks.folds import FoldJob, set_slots, train_fold_task

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
    with concurrency(GPU_LIMIT, occupy=1, lease_duration=LEASE):
        return train_fold_task(job)
