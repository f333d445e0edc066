"""The `agegender` command: the library's commands plus the orchestrated ones (`suite`).

The orchestration commands live here, not in `agegender.cli`, so the library never imports
Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from agegender import cli
from agegender.config import ConfigError, load_pretrain_config, load_section
from agegender.train import select_device
from deployments.stack import Stack, StackError, http_ok
from flows.settings import SuiteRun
from tasks import EPHEMERAL_STARTUP_VAR, StartupError
from tracking import TrackingError

DB_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")

ERRORS: tuple[type[Exception], ...] = (ConfigError, TrackingError, StackError, StartupError)


class ExpectedFailures(logging.Filter):
    """Keeps expected failures (bad input, see `agegender.cli.EXPECTED`) off the console while
    a flow runs: Prefect logs a failing task run and flow run with their tracebacks, announces
    retries and says again that each finished Failed, all before the CLI prints its one
    `error:` line.

    Only console handlers get this filter: Prefect's API handler still sends every record, so
    a server's UI keeps the tracebacks, and `--debug` leaves the console alone. Any other
    exception (a bug) is logged as Prefect logs it.
    """

    # how Prefect's records without a traceback name the exception they are about
    NAMED = re.compile(r"exception[: ]+(?:during execution: )?(\w+)[(:]")

    def __init__(self, expected: tuple[type[Exception], ...]) -> None:
        super().__init__()
        self.expected = expected
        self.names = {c.__name__ for c in expected}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if not isinstance(exc, self.expected):
                return True
            self.names.add(type(exc).__name__)  # a subclass: its later records name it
            return False
        if record.name.startswith("prefect"):
            named = self.NAMED.search(record.getMessage())
            return named is None or named.group(1) not in self.names
        return True


@contextmanager
def prefect_console(debug: bool) -> Iterator[None]:
    """`ExpectedFailures` on Prefect's console handlers while a flow command runs."""
    if debug:
        yield
        return
    import prefect.main  # noqa: F401  (sets up Prefect's logging: its handlers exist from here)

    quiet = ExpectedFailures((*cli.EXPECTED, *ERRORS))
    loggers = [logging.getLogger(), *map(logging.getLogger, ("prefect", "uvicorn", "fastapi"))]
    handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)}
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def flow_command(
    func: Callable[[argparse.Namespace], None],
) -> Callable[[argparse.Namespace], None]:
    """A command that runs Prefect flows: bad input ends in one `error:` line, as elsewhere,
    and so does an ephemeral Prefect server that does not start."""

    @functools.wraps(func)
    def run(a: argparse.Namespace) -> None:
        with prefect_console(a.debug), _prefect_started():
            func(a)

    return run


def _servers(run_root: Path) -> None:
    """Before a flow runs: servers configured must answer (fail fast naming them, not after
    minutes of retries); with no Prefect server configured, the ephemeral one keeps its SQLite
    file under the run root (beside MLflow's), not in ~/.prefect, so that two runs side by side
    (two clones, two `make demo`s, two test sessions) never share one database."""
    api = os.environ.get("PREFECT_API_URL")
    if api and not http_ok(api.rstrip("/") + "/health", timeout=10):
        raise TrackingError(
            f"Prefect API at {api} is unreachable; is the server running "
            "(`agegender stack status`) and PREFECT_API_URL right?"
        )
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        from tracking.store import check_server

        check_server(uri)
    keys = ("PREFECT_API_URL", *DB_VARS)
    if not any(os.environ.get(k) for k in keys):
        run_root.mkdir(parents=True, exist_ok=True)
        os.environ[DB_VARS[0]] = f"sqlite+aiosqlite:///{run_root.resolve() / 'prefect.db'}"


@contextmanager
def _prefect_started() -> Iterator[None]:
    """Prefect's ephemeral API server that did not start becomes one line naming the setting to
    raise (Prefect raises a bare RuntimeError with the server's output appended)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not text.startswith("Timed out while attempting to connect to ephemeral Prefect"):
            raise
        exited = re.search(r"exited with code (-?\d+)", text)
        why = f" (it exited with status {exited.group(1)})" if exited else ""
        raise StartupError(
            f"Prefect's ephemeral API server (started because PREFECT_API_URL is not set) did "
            f"not answer within {os.environ.get(EPHEMERAL_STARTUP_VAR)} s{why}; on a busy "
            f"machine raise {EPHEMERAL_STARTUP_VAR}, or start one server (`agegender stack up`) "
            "and point PREFECT_API_URL at it"
        ) from None


def cmd_suite(a: argparse.Namespace) -> None:
    suite, base = load_section("suite", SuiteRun, a.config, a.overrides, a.preset)
    if suite.mode == "tasks":  # folds train here: a CUDA device asked for must be here
        select_device(base.train.device)
    if a.data_root is None and a.cache is None:
        raise ValueError("give --data-root (an Adience download) or --cache (a prepared cache)")
    _servers(a.run_root)
    from flows.suite import run_suite  # Prefect starts only for this command

    res = run_suite(suite, base, a.cache or a.run_root / "cache", a.run_root, a.data_root)
    cli.out.print(res["summary"]["markdown"], highlight=False, markup=False, soft_wrap=True)
    cli.out.print(f"\n{res['trained']} fold(s) trained, {res['skipped']} already finished.")
    for variant, c in res.get("champions", {}).items():
        cli.out.print(
            f"{variant}: fold {c['fold']} registered as {c['name']} version {c['version']}, "
            f"{c['uri']}",
            highlight=False,
        )
    cli.out.print(
        f"MLflow UI on these results:\n  {sys.executable.rsplit('/', 1)[0]}/{res['ui']}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def cmd_pretrain(a: argparse.Namespace) -> None:
    overrides = [f"pretrain.source={a.source}", f"pretrain.root={a.data_root}", *a.overrides]
    pretrain, base = load_pretrain_config(a.config, overrides, a.preset)
    select_device(base.train.device)
    _servers(a.run_root)
    from flows.pretrain import run_pretrain  # Prefect starts only for this command

    res = run_pretrain(pretrain, base, a.run_root, a.experiment, a.image_size, a.cache)

    def human(d: dict[str, object]) -> None:
        verb = "pretrained" if d["trained"] else "already pretrained (reused)"
        cli.out.print(
            f"{verb}: MLflow run {d['run_id']}, registered as {d['model_uri']}", soft_wrap=True
        )
        cli.out.print(
            "test: " + ", ".join(f"{k} {v:.4f}" for k, v in res["test"].items()),
            highlight=False,
        )
        cli.out.print(f"checkpoint {d['checkpoint']}")
        cli.out.print(
            f"start the multitask_pretrained variant from it:\n  agegender suite ... "
            f"--run-root {a.run_root} suite.pretrained={d['model_uri']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )

    cli._emit(res, a.json, human)


def cmd_predict(a: argparse.Namespace) -> None:
    """`agegender predict` with a model URI: the registered model is fetched from MLflow."""
    if not a.model.startswith(("models:/", "runs:/")):
        cli.cmd_predict(a)
        return
    from tracking.store import Tracker, store_uri

    uri = store_uri(a.run_root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(
            f"--model {a.model}: no MLflow store at {uri}; set MLFLOW_TRACKING_URI or "
            "--run-root to the suite's"
        )
    with tempfile.TemporaryDirectory() as tmp:
        a.model = str(Tracker(None, a.run_root).download(a.model, Path(tmp)))
        cli.cmd_predict(a)


def cmd_stack(a: argparse.Namespace) -> None:
    stack = Stack.at(a.run_dir, a.db if a.action == "up" else None)
    if a.action == "up":
        env = stack.up(lambda m: cli.err.print(m, highlight=False))
        cli.out.print("stack up; point clients at it with:", highlight=False)
        for k, v in env.items():
            cli.out.print(f"  export {k}={v}", highlight=False, markup=False)
    elif a.action == "down":
        stopped = stack.down()
        cli.out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif a.action == "env":
        for k, v in stack.client_env().items():
            print(f"export {k}={v}")
    elif a.action == "crash-detection":
        _crash_detection(os.environ.get("PREFECT_API_URL") or stack.prefect_api)
    else:
        status = stack.status()
        if a.json:
            print(json.dumps(status, indent=2))
            return
        cli.out.print(f"database: {status['db']}", highlight=False)
        for name, s in status["services"].items():
            state = "healthy" if s["healthy"] else ("running" if s["running"] else "stopped")
            cli.out.print(
                f"{name:8} {state:8} pid {s['pid'] or '-':<8} {s['url']}", highlight=False
            )
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
    from deployments.automations import HEARTBEAT_S, MISSED, NAME, ensure_zombie_automation

    if not http_ok(api.rstrip("/") + "/health", timeout=10):
        raise StackError(f"Prefect API at {api} is unreachable; set PREFECT_API_URL to the server")
    heartbeat = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or HEARTBEAT_S)
    done = ensure_zombie_automation(api, heartbeat)
    cli.out.print(
        f"{api}: automation '{NAME}' {done} (CRASHED after {MISSED * heartbeat} s without a "
        f"heartbeat); flow runs send one every PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser(
        "suite", help="run the paper's experiments over all folds (Prefect + MLflow)"
    )
    s.add_argument("--data-root", type=Path, default=None, help="Adience download (has aligned/)")
    s.add_argument("--cache", type=Path, default=None, help="cache dir (default RUN_ROOT/cache)")
    cli.add_preset_argument(s)
    s.add_argument("--config", type=Path, default=None, help="YAML/JSON: suite + config sections")
    s.add_argument(
        "--run-root",
        type=Path,
        default=Path("runs/suite"),
        help="fold runs, MLflow store and artifacts (when no server is configured)",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. suite.slots=2 suite.pretrained=PATH train.epochs=20",
    )
    s.set_defaults(func=flow_command(cmd_suite))

    s = sub.add_parser(
        "pretrain",
        help="multi-task pretraining on CelebA or UTKFace (MLflow run + registered model)",
    )
    s.add_argument("--source", choices=["celeba", "utkface"], required=True)
    s.add_argument(
        "--data-root", type=Path, required=True, help="the source's download (official layout)"
    )
    s.add_argument("--cache", type=Path, default=None, help="default RUN_ROOT/cache-SOURCE")
    s.add_argument(
        "--image-size", type=int, default=256, help="cached image side (crop: data.crop)"
    )
    cli.add_preset_argument(s)
    s.add_argument(
        "--config", type=Path, default=None, help="YAML/JSON: pretrain + config sections"
    )
    s.add_argument(
        "--run-root",
        type=Path,
        default=Path("runs/suite"),
        help="as the suite's, so that it finds the run (when no MLflow server is configured)",
    )
    s.add_argument("--experiment", default="agegender", help="MLflow experiment (= suite.name)")
    s.add_argument("--json", action="store_true")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=5")
    s.set_defaults(func=flow_command(cmd_pretrain))

    s = sub.choices["predict"]
    s.add_argument(
        "--run-root",
        type=Path,
        default=Path("runs/suite"),
        help="the suite's, for models:/ URIs when no MLflow server is configured",
    )
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "stack", help="the local service stack: S3, MLflow, Prefect server and worker"
    )
    s.add_argument("action", choices=["up", "down", "status", "env", "crash-detection"])
    s.add_argument("--run-dir", type=Path, default=Path("runs/stack"), help="PIDs, logs, data")
    s.add_argument(
        "--db",
        choices=["sqlite", "postgres"],
        default=None,
        help="up: where Prefect and MLflow keep their data (default: the run dir's, else sqlite;"
        " postgres: a private PostgreSQL server from Debian's package, as docker/ does)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), argv, extra_errors=ERRORS)


if __name__ == "__main__":
    sys.exit(main())
