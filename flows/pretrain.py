"""Pretraining on a larger face set as its own flow: the backbone for `multitask_pretrained`.

The suite calls the same task when it is given no checkpoint; this flow is for pretraining
ahead of time (or on another machine) and passing `suite.pretrained=models:/...` later.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.settings import RETRIES
from tasks.pretrain import PretrainJob, pretrain_task
from tasks.slots import set_slots


@flow(name="pretrain", log_prints=True)
def pretrain_flow(job: PretrainJob, retries: int = RETRIES) -> dict[str, Any]:
    """Pretraining the backbone, retried like a fold: a retry resumes from the checkpoint.

    Args:
        job: the pretraining section (source, root, overrides), the base config, the run root,
            the MLflow experiment and the cache image size.
        retries: how often a failed pretraining starts again (suite.retries' default).
    """
    set_slots(1)
    return pretrain_task.with_options(retries=retries)(job)
