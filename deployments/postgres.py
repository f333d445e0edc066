"""The stack's private PostgreSQL server (`--db postgres`), from Debian's packages: its programs,
the user it runs as (it refuses root), a fresh data folder, the role and databases that Prefect
and MLflow log in with, and its health check. Its data folder and socket are the stack's own."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from deployments.services import StackError
from deployments.supervisor import Signal, as_user

ROLE = "agegender"  # the role Prefect and MLflow log in as; owns both databases
DATABASES = ("prefect", "mlflow", "mlflow_auth")  # mlflow_auth: its basic-auth users
# its fast shutdown: SIGINT to the server process alone (signals to its children disturb it)
STOP: Sequence[Signal] = ((os.kill, signal.SIGINT),)


def pg_bin() -> Path:
    """The PostgreSQL server programs: $AGEGENDER_PG_BIN, else the newest of Debian's."""
    given = os.environ.get("AGEGENDER_PG_BIN")
    found = (
        [Path(given)]
        if given
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for path in found:
        if all((path / exe).is_file() for exe in ("initdb", "postgres", "psql", "pg_isready")):
            return path
    where = given or "/usr/lib/postgresql/*/bin"
    raise StackError(
        f"--db postgres: no PostgreSQL server programs (initdb, postgres, psql, pg_isready) "
        f"in {where}; install Debian's `postgresql` package (`sudo apt-get install "
        "postgresql`), set AGEGENDER_PG_BIN to their folder, or use --db sqlite"
    )


def pg_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when we are root (it refuses root); None: ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "--db postgres as root: PostgreSQL refuses to run as root and the `postgres` user "
            "(made by Debian's `postgresql` package) does not exist; install the package"
        ) from None


def _as_pg_user(
    argv: list[str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as the user the server runs as."""
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        timeout=300,
        **as_user(pg_user()),
    )


def pg_ready(host: str, port: int) -> bool:
    try:
        res = subprocess.run(
            [str(pg_bin() / "pg_isready"), "-q", "-h", host, "-p", str(port), "-t", "5"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def command(data: Path, port: int, host: str, path: str) -> tuple[list[str], dict[str, str]]:
    """The server on `host:port`, its Unix socket in its data folder (only our set-up uses it)."""
    argv = [
        str(pg_bin() / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(data),
        "-c",
        f"listen_addresses={host}",
    ]
    return argv, {"PATH": path, "LC_ALL": "C"}


def init(data: Path) -> None:
    """A fresh data folder (initdb) unless there is one: local admin by peer over the
    data folder's socket, TCP on 127.0.0.1 only with scram-sha-256 passwords."""
    initdb = pg_bin() / "initdb"  # first: a missing install is the clearest error
    if (data / "PG_VERSION").is_file():
        return
    user = pg_user()
    data.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(data.parent, 0o700)
    if user is not None:
        os.chown(data.parent, user.pw_uid, user.pw_gid)
        reach = _as_pg_user(["test", "-w", str(data.parent)], cwd=Path("/"))
        if reach.returncode != 0:
            raise StackError(
                f"postgres: PostgreSQL runs as the `{user.pw_name}` user (it refuses root), "
                f"which cannot reach {data.parent}; make every folder above it searchable "
                "by that user (chmod o+x) or choose another --run-dir"
            )
    res = _as_pg_user(
        [
            str(initdb),
            "-D",
            str(data),
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ],
        cwd=data.parent,
    )
    if res.returncode != 0:
        raise StackError(f"postgres: initdb {data} failed:\n{res.stdout[-2000:]}")


def psql_admin(data: Path, port: int) -> list[str]:
    """psql as the server's own superuser, over the data folder's socket (peer auth)."""
    return [
        str(pg_bin() / "psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        str(data),
        "-p",
        str(port),
    ]


def create_role_and_databases(data: Path, port: int, password: str, log: Path) -> None:
    """The role (with this stack's password) and the `prefect` and `mlflow` databases."""
    sql = [
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
        f"'{ROLE}') THEN CREATE ROLE {ROLE} LOGIN; END IF; END$$;",
        f"ALTER ROLE {ROLE} WITH LOGIN PASSWORD '{password}';",
    ]
    for name in DATABASES:
        sql.append(
            f"SELECT 'CREATE DATABASE {name} OWNER {ROLE}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{name}')\\gexec"
        )
    res = _as_pg_user([*psql_admin(data, port), "-d", "postgres"], cwd=data, stdin="\n".join(sql))
    if res.returncode != 0:
        said = res.stderr.replace(password, "***")[-2000:]  # psql may echo the statement
        raise StackError(f"postgres: making the role and databases failed (see {log}):\n{said}")
