"""How the orchestration runs a suite: settings that change where and how folds run, never what
they train (so they are neither in the library's config nor in any config hash).

They are keys of the config file's `suite` section like the library's (`suite.retries=2`,
`suite.mode=deployments`), so a file or a deployment's parameters hold both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agegender.config import SuiteConfig

Mode = Literal["tasks", "deployments"]


class SuiteRun(SuiteConfig):
    """A suite and how to run it."""

    retries: int = Field(1, ge=0, description="a failed fold is retried, resuming its checkpoint")
    requeues: int = Field(
        3,
        ge=0,
        description="deployments mode: a fold's flow run that ended before the fold started "
        "(its worker died while it waited for a slot) is started again without spending a "
        "retry, at most this many times per fold, so that workers that never start folds "
        "still end the suite",
    )
    mode: Mode = Field(
        "tasks",
        description="tasks: folds in this process; deployments: each fold a flow run of "
        "`deployment` on a work pool (scale-out)",
    )
    deployment: str = Field("train_fold/train-fold", description="flow/deployment of a fold")
    register_champions: bool = Field(
        True,
        description="register each variant's best fold (by validation) as agegender-<variant> "
        "with the alias `champion`",
    )


RETRIES: int = SuiteRun.model_fields["retries"].default
REQUEUES: int = SuiteRun.model_fields["requeues"].default


def run_tags(suite: str, variant: str | None = None) -> list[str]:
    """Prefect tags of a suite's runs (`suite:<name>`, `variant:<variant>`), so the UI's tag
    filter finds one suite's or one variant's flow and task runs."""
    return [f"suite:{suite}"] + ([f"variant:{variant}"] if variant else [])
