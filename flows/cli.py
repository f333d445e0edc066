"""The `agegender` command, assembled: `build_parser` is the one place that builds it, from
each layer's `add_commands` (the library's `agegender.cli`, this module's orchestrated commands:
suite, pretrain, predict with model URIs; the ops room's `deployments.cli`: stack).

The orchestration commands live here, not in `agegender.cli`, so the library never imports
Prefect or MLflow. Flags and `key=value` overrides follow `agegender.cli.PRECEDENCE`: preset <
`--config` file < overrides < the command's own flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from agegender import cli
from agegender.cache import read_manifest
from agegender.config import (
    Config,
    ConfigError,
    PretrainConfig,
    Source,
    load_pretrain_config,
    load_section,
)
from agegender.train import select_device
from deployments import cli as ops_cli
from deployments.services import (
    EPHEMERAL_STARTUP_VAR,
    PREFECT_LOST_S,
    StackError,
    prefect_lost,
)
from flows.settings import SuiteRun
from serving import cli as serve_cli
from tracking import TrackingError

DB_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


class StartupError(RuntimeError):
    """A server this run needs did not start; the message names it and the setting to raise."""


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
        with prefect_console(a.debug), _prefect_started(), watch_prefect():
            func(a)

    return run


WATCH_S = 5.0  # how often a flow command asks its Prefect server whether it is still there


@contextmanager
def watch_prefect(api: str | None = None) -> Iterator[None]:
    """While a flow command runs on a Prefect server (PREFECT_API_URL), ask every `WATCH_S` s
    whether the server and its database are there; gone for `PREFECT_LOST_S` s, the command
    ends at once in one `error:` line naming what went away and what to run (exit 2).

    Without its server a flow can neither report nor finish: Prefect's client would retry for
    minutes, then print a traceback per call. Ending the process is safe: folds keep their
    checkpoints and MLflow runs, and a rerun skips or resumes them. Bound: the loss is seen
    within `WATCH_S` + two 5 s probes, and the command ends `PREFECT_LOST_S` + the same later:
    under a minute (50 s)."""
    api = api or os.environ.get("PREFECT_API_URL")
    if not api:  # the ephemeral server lives and dies with this process
        yield
        return
    done = threading.Event()

    def watch() -> None:
        lost_at = None
        while not done.wait(WATCH_S):
            problem = prefect_lost(api)
            if problem is None:
                lost_at = None
                continue
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at >= PREFECT_LOST_S and not done.is_set():
                cli._error(problem)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)

    threading.Thread(target=watch, name="watch-prefect", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _servers(run_root: Path) -> None:
    """Before a flow runs: servers configured must answer (fail fast naming them, not after
    minutes of retries); with no Prefect server configured, the ephemeral one keeps its SQLite
    file under the run root (beside MLflow's), not in ~/.prefect, so that two runs side by side
    (two clones, two `make demo`s, two test sessions) never share one database."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        ops_cli.reachable("Prefect API", api, "PREFECT_API_URL")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        ops_cli.reachable("MLflow", uri, "MLFLOW_TRACKING_URI")
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
    if a.data_root is None:
        _cache_has_size(a.cache, suite)
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
        f"MLflow UI on these results:\n  {ui_hint(res['ui'])}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _cache_has_size(cache: Path, suite: SuiteRun) -> None:
    """A `suite.image_size` or `suite.resize` that was given must be the prepared cache's:
    without --data-root nothing rebuilds it, and the folds would train on the cache's instead."""
    built = (read_manifest(cache) or {}).get("settings", {}).get("image_size")
    if "image_size" in suite.model_fields_set and built not in (None, suite.image_size):
        raise ConfigError(
            f"suite.image_size={suite.image_size}, but the cache {cache} was built at {built} px "
            f"and without --data-root nothing rebuilds it: add --data-root DIR to rebuild it at "
            f"{suite.image_size} px, or drop suite.image_size to train at {built} px"
        )
    resize = (read_manifest(cache) or {}).get("settings", {}).get("resize", "antialias")
    if "resize" in suite.model_fields_set and resize != suite.resize:
        raise ConfigError(
            f"suite.resize={suite.resize}, but the cache {cache} was resized with {resize} and "
            f"without --data-root nothing rebuilds it: add --data-root DIR to rebuild it, or drop "
            f"suite.resize"
        )


def ui_hint(command: str, bin_dir: Path = Path(sys.executable).parent) -> str:
    """`mlflow ui ...` from this venv (which may not be on PATH); `open URL` as it is."""
    return f"{bin_dir}/{command}" if command.startswith("mlflow ") else command


def pretrain_config(a: argparse.Namespace) -> tuple[PretrainConfig, Config]:
    flags = {"source": "pretrain.source", "data_root": "pretrain.root"}
    return load_pretrain_config(a.config, cli.flag_overrides(a, flags), a.preset)


def cmd_pretrain(a: argparse.Namespace) -> None:
    pretrain, base = pretrain_config(a)
    select_device(base.train.device)
    _servers(a.run_root)
    from flows.pretrain import pretrain_flow  # Prefect starts only for this command
    from tasks.pretrain import PretrainJob

    job = PretrainJob(
        pretrain=pretrain,
        config=base,
        run_root=str(a.run_root),
        experiment=a.experiment,
        image_size=a.image_size,
        cache_dir=str(a.cache) if a.cache else None,
    )
    res = pretrain_flow(job)

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


DESCRIPTION = (
    "Age group and gender from face photos: data, training, the paper's experiments over all "
    "folds (Prefect + MLflow), prediction, the service stack."
)


def build_parser() -> argparse.ArgumentParser:
    """The one `agegender` parser: `--debug`, then each layer's commands."""
    parser, sub = cli.new_parser(DESCRIPTION)
    cli.add_commands(sub, predict=False)  # `predict` is ours: it also takes model URIs
    add_commands(sub)
    ops_cli.add_commands(sub)
    serve_cli.add_commands(sub)
    return parser


def add_commands(sub: cli.Commands) -> None:
    """The orchestrated commands: suite, pretrain, and predict on files or model URIs."""
    s = cli.add_predict(
        sub, cmd_predict, "a best.pt (or its run folder), or models:/NAME@ALIAS or runs:/ID/PATH"
    )
    s.add_argument(
        "--run-root",
        type=Path,
        default=Path("runs/suite"),
        help="the suite's, for models:/ URIs when no MLflow server is configured",
    )

    s = sub.add_parser(
        "suite",
        help="run the paper's experiments over all folds (Prefect + MLflow)",
        epilog=cli.PRECEDENCE,
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
        epilog=cli.PRECEDENCE,
    )
    s.add_argument("--source", choices=get_args(Source), required=True, help="= pretrain.source")
    s.add_argument(
        "--data-root",
        type=Path,
        required=True,
        help="= pretrain.root: the source's download (official layout)",
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


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), argv, extra_errors=ERRORS)


if __name__ == "__main__":
    sys.exit(main())
