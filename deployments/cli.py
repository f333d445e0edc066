"""The ops room's sub-command, `agegender stack`, and the reachability check every command that
needs a server runs first. Imports the library (for its consoles) and this package only."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from agegender import cli
from deployments.automations import HEARTBEAT_S, MISSED, NAME, ensure_zombie_automation
from deployments.credentials import auth_configured, prefect_auth
from deployments.layout import DATABASES
from deployments.pools import count_gpus
from deployments.prefect_api import PrefectApi
from deployments.provision import provision
from deployments.services import REPO, StackError, health, mlflow_problem, prefect_refused
from deployments.stack import Stack


def add_commands(sub: cli.Commands) -> None:
    s = sub.add_parser(
        "stack", help="the local service stack: S3, MLflow, Prefect server and worker"
    )
    s.add_argument(
        "action", choices=["up", "down", "status", "env", "crash-detection", "provision"]
    )
    s.add_argument("--run-dir", type=Path, default=Path("runs/stack"), help="PIDs, logs, data")
    s.add_argument(
        "--db",
        choices=DATABASES,
        default=None,
        help="up: where Prefect and MLflow keep their data (default: the run dir's, else sqlite;"
        " postgres: a private PostgreSQL server from Debian's package, as docker/ does)",
    )
    s.add_argument(
        "--listen",
        metavar="ADDR",
        default=None,
        help="up: the address Prefect, MLflow and S3 listen on (default: the run dir's, else "
        "127.0.0.1); any other than loopback needs authentication set in the environment or "
        ".env (see .env.example)",
    )
    s.add_argument(
        "--for-worker",
        action="store_true",
        help="env: what a worker on another machine exports (URLs on the listen address, the "
        "worker's credentials)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stack)


def reachable(name: str, url: str, var: str) -> None:
    """Fail fast, naming the server, its problem and the setting that points at it, instead of
    retrying for minutes against nothing; a server that refuses this client's credentials
    names the variables that carry them."""
    if name == "MLflow":
        problem = mlflow_problem(url, var)
    else:  # Prefect's effective setting: it also reads .env and its profiles
        problem = health(url, timeout=10)
        if problem is not None:
            problem = (
                f"{name} at {url} is unreachable ({problem}); is it running "
                f"(`agegender stack status`) and {var} right?"
            )
        else:
            from prefect.settings import get_current_settings

            secret = get_current_settings().api.auth_string
            problem = prefect_refused(url, secret.get_secret_value() if secret else None)
    if problem is not None:
        raise StackError(problem)


def cmd_stack(a: argparse.Namespace) -> None:
    up = a.action == "up"
    if a.listen and not up:
        raise StackError("--listen belongs to `stack up` (the others read it from the run dir)")
    stack = Stack.at(
        a.run_dir,
        a.db if up else None,
        listen=a.listen if up else None,
        auth=auth_configured() if up else None,
    )
    if up:
        env = stack.up(lambda m: cli.err.print(m, highlight=False))
        cli.out.print("stack up; point clients at it with:", highlight=False)
        for k, v in env.items():
            cli.out.print(f"  export {k}={v}", highlight=False, markup=False)
        if stack.auth:
            cli.out.print(
                "the servers ask for credentials: `agegender stack env --for-worker` prints a "
                "worker's (secrets: keep the output off shared places)",
                highlight=False,
                markup=False,
            )
    elif a.action == "down":
        stopped = stack.down()
        cli.out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif a.action == "env" and a.for_worker:
        for k, v in stack.worker_env().items():
            print(f"export {k}={shlex.quote(v)}")
    elif a.action == "env":
        for k, v in stack.client_env().items():
            print(f"export {k}={v}")
        if stack.auth:
            print(
                "# the servers ask for credentials: `agegender stack env --for-worker` prints "
                "them (a worker's)"
            )
    elif a.action == "crash-detection":
        _crash_detection(os.environ.get("PREFECT_API_URL") or stack.prefect_api)
    elif a.action == "provision":
        _provision(os.environ.get("PREFECT_API_URL") or stack.prefect_api)
    else:
        status = stack.status()
        if a.json:
            print(json.dumps(status, indent=2))
            return
        cli.out.print(f"database: {status['db']}", highlight=False)
        auth = "credentials required" if status["auth"] else "no authentication"
        cli.out.print(f"listening on {status['listen']} ({auth})", highlight=False)
        for name, s in status["services"].items():
            state = "healthy" if s["healthy"] else ("running" if s["running"] else "stopped")
            cli.out.print(
                f"{name:10} {state:8} pid {s['pid'] or '-':<8} {s['url']}", highlight=False
            )
        if "prefect_error" in status:
            cli.out.print(f"no pools, workers or runs: {status['prefect_error']}", highlight=False)
        for pool, info in status.get("pools", {}).items():
            workers = status["workers"].get(pool, [])
            cli.out.print(
                f"pool {pool} ({info['type']}, {info['status']}): {len(workers)} worker(s)"
            )
        if "deployments" in status:
            cli.out.print("deployments: " + ", ".join(status["deployments"]))
        _print_schedules(status)
        for r in status.get("last_runs", []):
            cli.out.print(f"  {r['name']}: {r['state']} {r['start'] or ''}", highlight=False)


def _crash_detection(api: str) -> None:
    """The zombie-flow automation on any Prefect server (the compose stack's, say), for the
    heartbeat period its clients use (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, else Prefect's)."""
    reachable("Prefect API", api, "PREFECT_API_URL")
    heartbeat = _heartbeat()
    done = ensure_zombie_automation(PrefectApi(api, prefect_auth()), heartbeat)
    cli.out.print(
        f"{api}: automation '{NAME}' {done} (CRASHED after {MISSED * heartbeat} s without a "
        f"heartbeat); flow runs send one every PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _heartbeat() -> int:
    """The heartbeat period of this server's clients (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, else
    Prefect's), which the crash automation waits three of."""
    return int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or HEARTBEAT_S)


def _provision(api: str) -> None:
    """What `stack up` makes, on any Prefect server (the compose stack's `prefect-init` runs
    this): pools, the GPU limit (AGEGENDER_GPU_SLOTS, else this machine's GPUs), the deployments
    (from the checkout AGEGENDER_HOME) and the crash automation for this heartbeat period."""
    reachable("Prefect API", api, "PREFECT_API_URL")
    heartbeat = _heartbeat()
    slots = int(os.environ.get("AGEGENDER_GPU_SLOTS") or max(count_gpus(), 1))
    env = {"AGEGENDER_HOME": str(REPO)} | dict(os.environ)
    provision(PrefectApi(api, prefect_auth()), env, slots, heartbeat, cli.out.print)
    cli.out.print(f"{api}: provisioned (gpu-slots {slots}, heartbeat {heartbeat} s)")


def _print_schedules(status: dict[str, object]) -> None:
    """Each schedule: on or paused, next date, and the paths it would run with."""
    schedules = status.get("schedules")
    for s in schedules if isinstance(schedules, list) else []:
        state = "active" if s["active"] else "paused"
        cli.out.print(
            f"schedule {s['deployment']} {s['schedule']}: {state}, next {s['next_run'] or '-'}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        for c in s["parameters"]:
            mark = "ok" if c["ok"] else f"MISSING on this machine (needs {c['need']})"
            cli.out.print(f"  {c['name']} = {c['value']}: {mark}", highlight=False, markup=False)
        if not s["active"]:
            verdict = "its parameters resolve" if s["resolves"] else "fix its parameters first"
            cli.out.print(f"  turn it on ({verdict}): {s['resume']}", highlight=False, markup=False)
    crash = status.get("crash_detection")
    if isinstance(crash, dict):
        cli.out.print(
            f"crash detection: runs without a heartbeat for {crash['crashed_after_s']:.0f} s "
            f"are marked CRASHED ({'enabled' if crash['enabled'] else 'DISABLED'})",
            highlight=False,
        )
    elif "schedules" in status:
        cli.out.print("crash detection: none (`agegender stack crash-detection` creates it)")
