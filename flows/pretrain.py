"""Pretraining on a larger face set as its own flow: the backbone for `multitask_pretrained`.

The suite calls the same task when it is given no checkpoint; this flow is for pretraining
ahead of time (or on another machine) and passing `suite.pretrained=models:/...` later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from agegender.config import Config, PretrainConfig
from flows.settings import RETRIES
from tasks.pretrain import pretrain_task
from tasks.slots import set_slots


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    pretrain: PretrainConfig,
    config: Config,
    run_root: str,
    experiment: str = "agegender",
    image_size: int = 256,
    cache_dir: str | None = None,
    retries: int = RETRIES,
) -> dict[str, Any]:
    """Pretraining, retried like a fold (`retries`, suite.retries' default): a retry resumes
    from the checkpoint. `config` is the base config; `pretrain.overrides` go on top."""
    set_slots(1)
    return pretrain_task.with_options(retries=retries)(
        pretrain, pretrain.train_config(config), run_root, experiment, image_size, cache_dir
    )


def run_pretrain(
    pretrain: PretrainConfig,
    base: Config,
    run_root: Path,
    experiment: str,
    image_size: int,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    return pretrain_flow(
        pretrain, base, str(run_root), experiment, image_size, str(cache_dir) if cache_dir else None
    )
