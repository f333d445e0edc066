"""One fold as its own flow, for scale-out: the suite runs it through the `train_fold`
deployment on a work pool (`remote_fold_task`, below), so any number of workers on any number of
machines take folds.

The fold holds one slot of the global concurrency limit `GPU_LIMIT` (created by the stack with
one slot per GPU) while it trains; a worker that dies loses its lease after `LEASE` seconds, so
its slot comes back, and the server marks its flow run CRASHED once its heartbeats stop
(deployments/automations.py), so the waiting suite starts the fold again. What is logged to
MLflow is exactly what the in-process task logs.

A fold's flow run tags itself `STARTED` once it holds its slot, before it touches the fold, and
ends with a message that says what it did (`TRAINED` or `SKIPPED`): the suite counts a retry
only for a run that started its fold (runs lost while they waited for a slot are started again
up to `suite.requeues` times) and counts trained and skipped folds as in-process mode does.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed

from agegender.cli import EXPECTED
from agegender.train import RunError, select_device
from deployments.services import GPU_LIMIT, PREFECT_LOST_S, StackError, prefect_lost
from flows.settings import REQUEUES, run_tags
from tasks.folds import FoldJob, train_fold_task
from tasks.slots import on_device, set_slots

LEASE = 60.0  # the server accepts no shorter lease
BAD_INPUT = "bad input: "  # a fold flow run's failure message: data or settings, not the worker
# a suite waiting on a lost server gives up after this long; the command's own watch
# (flows/cli.py: watch_prefect, PREFECT_LOST_S) ends it sooner, without the flow's tracebacks
GIVE_UP_S = 3 * PREFECT_LOST_S
STARTED = "fold:started"  # the tag of a fold's flow run that got its slot and started the fold
TRAINED, SKIPPED = "trained", "already finished"  # how a completed fold flow run's message starts


def tag_this_run(*tags: str) -> None:
    """Add tags to the running flow run (a deployment's run was created by whoever triggered
    it, before the suite's name was known; a fold's says it started)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(ctx.flow_run.id)
        want = list(dict.fromkeys([*run.tags, *tags]))
        if want != list(run.tags):
            client.update_flow_run(run.id, tags=want)


@flow(name="train_fold", log_prints=True)
def train_fold_flow(job: FoldJob, device: str | None = None) -> dict[str, Any] | State[Any]:
    """One fold of a suite, trained (or skipped when an identical run finished) and logged as
    a child of its variant's MLflow parent run.

    Args:
        job: the fold, its variant's config, the cache and run root, the suite (the MLflow
            experiment) and the parent run; the suite sends it in scale-out mode.
        device: what the deployment requires (`cuda` on the GPU pool: a container without a
            GPU fails at once instead of training on its CPU); null keeps the job's
            train.device.
    """
    if device is not None and not job.config.train.device.startswith(device):
        # (cuda:1 already is a cuda device)
        job = job.model_copy(update={"config": on_device(job.config, device)})
    try:
        select_device(job.config.train.device)
        set_slots(1)
        with concurrency(GPU_LIMIT, occupy=1, lease_duration=LEASE):
            tag_this_run(STARTED)  # before the fold: a run without it never trained
            got = train_fold_task(job)
    except EXPECTED as exc:  # stays bad on any worker: the suite reports it, not retries it
        return Failed(message=f"{BAD_INPUT}{exc}")
    did = TRAINED if got["trained"] else SKIPPED
    return Completed(message=f"{did} (MLflow run {got['run_id']})", data=got)


def read_while_away(client: SyncPrefectClient, run: FlowRun) -> FlowRun:
    """The flow run as the server has it now. A read that fails while the server is away (down,
    or up without its database: a dead PostgreSQL answers HTTP 500) waits for it, then ends
    in one StackError naming what went away; a failure with the server healthy is raised."""
    lost_at = time.monotonic()
    while True:
        try:
            return client.read_flow_run(run.id)
        except Exception:
            problem = prefect_lost(str(client.api_url).rstrip("/"))
            if problem is None:
                raise
            if time.monotonic() - lost_at > GIVE_UP_S:
                raise StackError(problem) from None
            time.sleep(2)


@task(task_run_name="{job.variant}-fold{job.fold}", cache_policy=NO_CACHE)
def remote_fold_task(
    deployment: str, retries: int, job: FoldJob, requeues: int = REQUEUES
) -> dict[str, Any]:
    """One fold as a flow run of the `train_fold` deployment on a work pool. A run that fails,
    or that the server marked CRASHED (its heartbeats stopped: the worker or its machine died,
    wherever it was; deployments/automations.py), is started again and resumes from its
    checkpoint: `retries` times if it had started the fold, `requeues` times if it ended before
    (it waited for a slot: the fold lost nothing). Bad input (data, settings, a GPU asked of a
    worker without one) is not: one error naming the fold. Returns whether the fold trained
    or was skipped as already finished, as the flow run's final message says."""
    log = get_run_logger()
    name, params = job.name, {"job": job.model_dump(mode="json")}
    state = None
    tries = lost = 0  # flow runs that ended after / before they started the fold
    while True:
        run = run_deployment(
            deployment,
            parameters=params,
            flow_run_name=name,
            timeout=0,
            tags=run_tags(job.suite, job.variant),
        )
        assert isinstance(run, FlowRun)  # the sync call returns the run, not a coroutine
        with get_client(sync_client=True) as client:
            while True:
                run = read_while_away(client, run)
                state = run.state
                if state is not None and state.is_final():
                    break
                time.sleep(2)
        message = (state and state.message) or ""
        if state is not None and state.is_failed() and message.startswith(BAD_INPUT):
            raise RunError(
                f"{name} (flow run {run.name} of {deployment}): {message[len(BAD_INPUT) :]}"
            )
        if state is not None and state.is_completed():
            log.info(f"{name}: flow run {run.name} ({run.id}) completed: {message}")
            return {
                "variant": job.variant,
                "fold": job.fold,
                "flow_run_id": str(run.id),
                "trained": not message.startswith(SKIPPED),  # a worker without it: as before
            }
        why = f"{name}: flow run {run.name} ({run.id}) of {deployment} ended {state and state.name}"
        why += f" ({message})" if message else ""
        if STARTED not in run.tags:
            lost += 1
            if lost > requeues:
                raise RunError(
                    f"{why}: {lost} of its flow runs ended before the fold started, more than "
                    f"suite.requeues={requeues}; check that the pool's workers run folds "
                    "(`agegender stack status`, the worker's log)"
                )
            log.warning(
                f"{why} before the fold started (it waited for a slot): started again, "
                f"not counted as a retry ({lost} of suite.requeues={requeues})"
            )
            continue
        tries += 1
        if tries > retries:
            raise RunError(
                f"{why}: {tries} of its flow runs failed after the fold started, more than "
                f"suite.retries={retries}; their logs are in the Prefect UI"
            )
        log.warning(f"{why}: started again, resuming (retry {tries} of {retries})")
