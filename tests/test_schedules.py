"""Schedules that start paused and say whether they would run here; crash detection that needs
no host or pid (the stack tests run both against a real server)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

from deployments.automations import NAME, zombie_automation
from deployments.schedules import check_parameters, next_date
from tests.conftest import REPO

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def _deployments() -> dict[str, Any]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_every_schedule_in_prefect_yaml_starts_paused() -> None:
    schedules = [(n, s) for n, d in _deployments().items() for s in d.get("schedules") or []]
    assert schedules, "prefect.yaml has no schedule left to check"
    for name, schedule in schedules:
        assert schedule.get("active") is False, f"{name}: schedule {schedule} is on by default"


def _by_name(checks: list[dict[str, Any]]) -> dict[str, bool]:
    return {c["name"]: c["ok"] for c in checks}


def test_the_suite_schedules_parameters_are_checked_against_this_machine(tmp_path: Path) -> None:
    params = _deployments()["suite"]["parameters"]
    checks = _by_name(check_parameters(params))
    assert set(checks) == {"data_root", "cache_dir", "run_root", "suite.pretrain.root"}
    assert checks["data_root"] == Path(params["data_root"]).is_dir()
    assert checks["suite.pretrain.root"] == Path(params["suite"]["pretrain"]["root"]).is_dir()

    (tmp_path / "adience").mkdir()
    (tmp_path / "celeba").mkdir()
    here = {
        "data_root": str(tmp_path / "adience"),
        "cache_dir": str(tmp_path / "runs" / "cache"),  # made by the run
        "run_root": str(tmp_path / "runs"),
        "suite": {"pretrain": {"root": str(tmp_path / "celeba")}},
    }
    assert all(_by_name(check_parameters(here)).values())
    # no data root: the cache must exist already
    assert _by_name(check_parameters(here | {"data_root": None}))["cache_dir"] is False
    # a given backbone replaces pretraining; a missing file does not resolve
    given = here | {"suite": {"pretrained": str(tmp_path / "nowhere.pt")}}
    assert _by_name(check_parameters(given)) == {
        "data_root": True,
        "cache_dir": True,
        "run_root": True,
        "suite.pretrained": False,
    }
    remote = here | {"suite": {"pretrained": "models:/agegender-pretrained-celeba/1"}}
    assert "suite.pretrained" not in _by_name(check_parameters(remote))
    # a run root under a file can never be made
    (tmp_path / "file").write_text("x")
    assert not _by_name(check_parameters(here | {"run_root": str(tmp_path / "file" / "r")}))[
        "run_root"
    ]
    bad = check_parameters(here | {"suite": {"variants": ["nope"]}})
    assert [c["name"] for c in bad] == ["suite"]
    assert not bad[0]["ok"]


def test_next_date_of_the_weekly_cron_is_a_monday() -> None:
    from datetime import datetime

    date = next_date({"cron": "0 3 * * 1", "timezone": "UTC"})
    assert date is not None
    when = datetime.fromisoformat(date)
    assert (when.weekday(), when.hour, when.minute) == (0, 3, 0)


def test_the_zombie_automation_crashes_runs_whose_heartbeats_stop() -> None:
    body = zombie_automation(30)
    trigger = body["trigger"]
    assert body["name"] == NAME
    assert trigger["posture"] == "Proactive"
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert trigger["within"] == 90.0  # three missed heartbeats
    assert [(a["type"], a["state"]) for a in body["actions"]] == [
        ("change-flow-run-state", "CRASHED")
    ]


def test_no_code_path_compares_hosts_or_pids() -> None:
    """Crash detection must work when the worker is on another machine: nothing in the flows
    or tasks may ask which host or process it runs in."""
    for path in [*(REPO / "flows").glob("*.py"), *(REPO / "tasks").glob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"gethostname", "getpid", "alive"}, path


def test_crash_detection_on_an_unreachable_server_is_one_error_line() -> None:
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("agegender")
    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    res = subprocess.run(
        [str(script), "stack", "crash-detection"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: Prefect API at http://127.0.0.1:9/api is unreachable ([Errno 111] Connection "
        "refused); is it running (`agegender stack status`) and PREFECT_API_URL right?"
    )


def test_process_workers_run_from_the_shared_checkout_and_gpu_ones_from_the_image() -> None:
    """The scale-out contract for code: deployments on the process pool `local` change into
    `$AGEGENDER_HOME` (the checkout `stack up` deploys from, which every process worker must
    see at that path); the GPU containers into the image's /app."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    step = "prefect.deployments.steps.set_working_directory"
    shared = [{step: {"directory": "{{ $AGEGENDER_HOME }}"}}]
    assert spec["pull"] == shared
    for name, d in _deployments().items():
        pull = d.get("pull", spec["pull"])
        if d["work_pool"]["name"] == "local":
            assert pull == shared, name
        else:
            assert pull == [{step: {"directory": "/app"}}], name
