"""The `agegender` command: the library's commands plus the orchestrated ones (`suite`).

The orchestration commands live here, not in `agegender.cli`, so the library never imports
Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agegender import cli
from agegender.config import ConfigError, load_suite_config


def cmd_suite(a: argparse.Namespace) -> None:
    suite, base = load_suite_config(a.config, a.overrides)
    if a.data_root is None and a.cache is None:
        raise ValueError("give --data-root (an Adience download) or --cache (a prepared cache)")
    run_root = a.run_root
    cache_dir = a.cache or run_root / "cache"
    from flows.suite import run_suite  # Prefect starts only for this command

    res = run_suite(suite, base, cache_dir, run_root, a.data_root)
    cli.out.print(res["summary"]["markdown"], highlight=False, markup=False, soft_wrap=True)
    cli.out.print(f"\n{res['trained']} fold(s) trained, {res['skipped']} already finished.")
    cli.out.print(
        f"MLflow UI on these results:\n  {sys.executable.rsplit('/', 1)[0]}/{res['ui']}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser(
        "suite", help="run the paper's experiments over all folds (Prefect + MLflow)"
    )
    s.add_argument("--data-root", type=Path, default=None, help="Adience download (has aligned/)")
    s.add_argument("--cache", type=Path, default=None, help="cache dir (default RUN_ROOT/cache)")
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
    s.set_defaults(func=cmd_suite)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), argv, extra_errors=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
