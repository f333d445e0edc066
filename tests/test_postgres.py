"""`agegender stack up --db postgres`: the stack's own PostgreSQL (Debian's package), started,
shown and stopped by the stack; a missing install is one line naming the package. The whole
stack on PostgreSQL is tested in test_stack.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from deployments.layout import Ports
from deployments.postgres import pg_ready
from deployments.stack import Stack
from deployments.supervisor import alive, port_open
from tests.conftest import REPO

SHIFT = 101 + int(os.environ.get("AGEGENDER_TEST_PORT_SHIFT", "0")) + 1  # beside the test stack


def _agegender(*args: str | Path, env: dict[str, str] | None = None) -> Any:
    script = Path(sys.executable).with_name("agegender")
    return subprocess.run(
        [str(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def _dsn(st: Stack) -> str:
    """The MLflow database's URL as psycopg2 itself takes it."""
    return st.database_url("mlflow").replace("postgresql+psycopg2://", "postgresql://")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder PostgreSQL's own user can reach when the tests run as root (pytest's temp
    folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="agegender-test-pg-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration
def test_stack_down_stops_postgresql_and_keeps_its_data(reachable_dir: Path) -> None:
    st = Stack(reachable_dir / "stack", ports=Ports.shifted(SHIFT), db="postgres")
    pid = st.start("postgres", {})
    try:
        with psycopg2.connect(_dsn(st)) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        status = _agegender("stack", "status", "--json", "--run-dir", st.run_dir)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["db"] == "postgres"
        assert shown["services"]["postgres"] == {
            "pid": pid,
            "running": True,
            "healthy": True,
            "url": f"postgresql://127.0.0.1:{st.ports.postgres}",
            "log": str(st.log("postgres")),
        }
        # another process (the CLI) stops it, from the run dir's record alone
        down = _agegender("stack", "down", "--run-dir", st.run_dir)
        assert down.returncode == 0, down.stderr
        assert down.stdout.strip() == "stopped: postgres"
        assert not alive(pid)
        assert not port_open("127.0.0.1", st.ports.postgres)
        assert not pg_ready("127.0.0.1", st.ports.postgres)
        # started again: the same data, role and password
        st.start("postgres", {})
        with psycopg2.connect(_dsn(st)) as conn, conn.cursor() as cur:
            cur.execute("SELECT x FROM kept")
            assert cur.fetchall() == [(7,)]
    finally:
        st.down()


def test_a_missing_postgresql_install_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AGEGENDER_PG_BIN": str(tmp_path / "no-postgresql"),
    }
    run_dir = tmp_path / "stack"
    res = _agegender("stack", "up", "--db", "postgres", "--run-dir", run_dir, env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --db postgres: no PostgreSQL server programs (initdb, postgres, psql, "
        f"pg_isready) in {tmp_path / 'no-postgresql'}; install Debian's `postgresql` package "
        "(`sudo apt-get install postgresql`), set AGEGENDER_PG_BIN to their folder, or use "
        "--db sqlite"
    ]
    assert (
        not (run_dir / "stack.json").exists()
        or not json.loads((run_dir / "stack.json").read_text())["pids"]
    )
