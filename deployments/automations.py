"""Crash detection through Prefect itself: flow runs send heartbeats, and a server automation
marks a run CRASHED when its heartbeats stop ("zombie" flow runs, Prefect's documented recipe).

This works wherever the worker runs: nothing compares hosts or process ids. A suite waiting on a
fold's flow run sees it end CRASHED and starts it again; the fold resumes from its checkpoint.
`agegender stack up` creates the automation; `agegender stack crash-detection` creates it on any
Prefect server (the compose stack's, for example). Both leave one automation, never two.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from deployments.prefect_api import PrefectApi

# flows.heartbeat_frequency: Prefect's own default, so that flow runs of clients that set
# nothing (any machine, any container) are never taken for dead. Every flow run on the server
# is watched, so a shorter period needs every client to send it (`agegender stack env`
# exports it; the test stack uses 30 s, Prefect's minimum).
HEARTBEAT_S = 180
MISSED = 3  # heartbeats a run may miss (a loaded machine) before it counts as crashed
NAME = "agegender: crash flow runs whose heartbeats stopped"


def heartbeat_env(heartbeat_s: int = HEARTBEAT_S) -> dict[str, str]:
    """What a worker needs so that the flow runs it starts send heartbeats this often."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}


def zombie_automation(heartbeat_s: int = HEARTBEAT_S) -> dict[str, Any]:
    """The automation's JSON body: after a run's heartbeat, expect another event of that run
    (heartbeat or state change) within MISSED heartbeats, else change its state to CRASHED."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = AutomationCore(
        name=NAME,
        description=(
            f"Flow runs send a heartbeat every {heartbeat_s} s "
            f"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY); a run silent for {MISSED * heartbeat_s} s "
            "lost its process (a killed worker, a lost machine) and is marked CRASHED."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED * heartbeat_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {MISSED * heartbeat_s} s: its process is gone",
            )
        ],
    )
    return automation.model_dump(mode="json")


def _same(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal as automations (parsed by Prefect's model: the server's extra fields, the
    trigger's id and the order of its sets do not count)."""
    from prefect.events.schemas.automations import AutomationCore

    def norm(a: dict[str, Any]) -> dict[str, Any]:
        parsed = AutomationCore.model_validate(a)
        return parsed.model_dump(mode="json", exclude={"trigger": {"id"}})

    return norm(have) == norm(want)


def ensure_zombie_automation(api: PrefectApi, heartbeat_s: int = HEARTBEAT_S) -> str:
    """Create the automation, or update it to this heartbeat; duplicates are removed. Returns
    what was done ("created", "updated" or "unchanged")."""
    want = zombie_automation(heartbeat_s)
    found = [a for a in api("POST", "/automations/filter", {}) if a["name"] == NAME]
    for extra in found[1:]:
        api("DELETE", f"/automations/{extra['id']}")
    if not found:
        api("POST", "/automations/", want)
        return "created"
    if _same(found[0], want):
        return "unchanged"
    api("PUT", f"/automations/{found[0]['id']}", want)
    return "updated"


def crash_detection(api: PrefectApi) -> dict[str, Any] | None:
    """The automation as the server has it (None if missing): for `stack status`."""
    for a in api("POST", "/automations/filter", {}):
        if a["name"] == NAME:
            within = float(a["trigger"].get("within", 0))
            return {"name": NAME, "enabled": bool(a.get("enabled")), "crashed_after_s": within}
    return None
