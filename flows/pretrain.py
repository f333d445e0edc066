"""Pretraining on a larger face set as its own flow: the backbone for `multitask_pretrained`.

The suite calls the same task when it is given no checkpoint; this flow is for pretraining
ahead of time (or on another machine) and passing `suite.pretrained=models:/...` later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from agegender.config import Config, PretrainConfig, SuiteConfig
from tasks.folds import set_slots
from tasks.pretrain import pretrain_task


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    pretrain: dict[str, Any],
    config: dict[str, Any],
    run_root: str,
    experiment: str = "agegender",
    image_size: int = 256,
    cache_dir: str | None = None,
    retries: int = SuiteConfig.model_fields["retries"].default,
) -> dict[str, Any]:
    """Pretraining, retried like a fold (`retries`, suite.retries' default): a retry resumes
    from the checkpoint."""
    set_slots(1)
    p = PretrainConfig.model_validate(pretrain)
    cfg = p.train_config(Config.model_validate(config))
    return pretrain_task.with_options(retries=retries)(
        p.model_dump(mode="json"),
        cfg.model_dump(mode="json"),
        run_root,
        experiment,
        image_size,
        cache_dir,
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
        pretrain.model_dump(mode="json"),
        base.model_dump(mode="json"),
        str(run_root),
        experiment,
        image_size,
        str(cache_dir) if cache_dir else None,
    )
