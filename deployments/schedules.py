"""What `agegender stack status` says about schedules: each one, whether it is on, when it runs
next, and whether its parameters name paths that exist on this machine.

Schedules ship paused (`deployments/prefect.yaml`): a weekly run whose `/data/...` paths do
not exist here would only fail every Monday. This report is how a user sees what a schedule
would do before `prefect deployment schedule resume` turns it on.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agegender.config import SuiteConfig
from deployments.prefect_api import PrefectApi


def _creatable(path: Path) -> bool:
    """The folder exists or could be made: its nearest existing ancestor is a writable folder."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


TRAINS = frozenset(SuiteConfig.model_fields)


def check_parameters(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Each path parameter of a suite/cross-validate run and whether it resolves here."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: Any, ok: bool, need: str) -> None:
        checks.append({"name": name, "value": value, "ok": ok, "need": need})

    # what the suite trains; how it runs (flows.settings: mode, retries...) is the flow's to
    # check, and Prefect validates every parameter against the flow's signature at run time
    section = {k: v for k, v in (params.get("suite") or {}).items() if k in TRAINS}
    try:
        suite = SuiteConfig.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        add("suite", params.get("suite"), False, f"a valid suite section ({where}: {first['msg']})")
        return checks
    data_root = params.get("data_root")
    if data_root is not None:
        add("data_root", data_root, Path(data_root).is_dir(), "an Adience download (a folder)")
    if "cache_dir" in params:
        cache = Path(params["cache_dir"])
        if data_root is not None:
            add("cache_dir", str(cache), _creatable(cache), "a folder it can create or update")
        else:
            add("cache_dir", str(cache), cache.is_dir(), "a prepared cache (no data_root given)")
    if "run_root" in params:
        root = Path(params["run_root"])
        add("run_root", str(root), _creatable(root), "a folder it can create or write")
    if "multitask_pretrained" in suite.variants:
        if suite.pretrained is None:
            source = suite.pretrain.root
            add(
                "suite.pretrain.root",
                None if source is None else str(source),
                source is not None and Path(source).is_dir(),
                f"the {suite.pretrain.source} download (pretraining comes first)",
            )
        elif not suite.pretrained.startswith(("runs:/", "models:/")):
            ok = Path(suite.pretrained).exists()
            add("suite.pretrained", suite.pretrained, ok, "a best.pt checkpoint")
    return checks


def next_date(schedule: dict[str, Any]) -> str | None:
    """The schedule's next date from now (cron schedules; others: None)."""
    if not schedule.get("cron"):
        return None
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(
        cron=schedule["cron"],
        timezone=schedule.get("timezone") or "UTC",
        day_or=schedule.get("day_or", True),
    )
    dates = asyncio.run(cron.get_dates(n=1))
    return dates[0].isoformat() if dates else None


def describe(schedule: dict[str, Any]) -> str:
    if schedule.get("cron"):
        return f"cron '{schedule['cron']}' {schedule.get('timezone') or 'UTC'}"
    if schedule.get("interval") is not None:
        return f"every {schedule['interval']} s"
    return f"rrule '{schedule.get('rrule')}'"


def schedules(api: PrefectApi, check: bool = True) -> list[dict[str, Any]]:
    """Every deployment schedule: on or paused, its next date, and (`check`) whether the
    parameters it runs with name paths that exist on this machine."""
    flows = {f["id"]: f["name"] for f in api("POST", "/flows/filter", {})}
    out: list[dict[str, Any]] = []
    for d in api("POST", "/deployments/filter", {}):
        name = f"{flows.get(d['flow_id'], '?')}/{d['name']}"
        for s in d.get("schedules") or []:
            item: dict[str, Any] = {
                "deployment": name,
                "deployment_id": d["id"],
                "schedule_id": s["id"],
                "schedule": describe(s["schedule"]),
                "active": bool(s.get("active")) and not d.get("paused"),
                "resume": f"prefect deployment schedule resume {name} {s['id']}",
            }
            if check:
                params = (d.get("parameters") or {}) | (s.get("parameters") or {})
                item["next_run"] = next_date(s["schedule"])
                item["parameters"] = check_parameters(params)
                item["resolves"] = all(c["ok"] for c in item["parameters"])
            out.append(item)
    return out


def active(api: PrefectApi) -> set[tuple[str, str]]:
    """(deployment, schedule) pairs the user turned on: a second `stack up` redeploys
    prefect.yaml, whose schedules start paused, and must not turn them off again."""
    return {(s["deployment"], s["schedule"]) for s in schedules(api, check=False) if s["active"]}


def resume(api: PrefectApi, keep: set[tuple[str, str]]) -> None:
    """Turn `keep`'s schedules back on where a redeploy paused them."""
    for s in schedules(api, check=False):
        if (s["deployment"], s["schedule"]) in keep and not s["active"]:
            path = f"/deployments/{s['deployment_id']}/schedules/{s['schedule_id']}"
            api("PATCH", path, {"active": True})
