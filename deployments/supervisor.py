"""Process supervision for the native stack: each service in its own process group, its PID in
`RUN_DIR/stack.json`, its output in `RUN_DIR/logs/NAME.log`; started services are waited for
by their health check (never a fixed sleep) and stopped by exactly the group we started.

Weighed against supervisord and friends: they bring a daemon of their own, a config format and
an RPC port to secure, and still need our health checks and PostgreSQL's user switch; this
file is what the stack needs and no more."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from pwd import struct_passwd
from typing import Any

from deployments.services import StackError

STARTUP_VAR = "AGEGENDER_STARTUP_TIMEOUT"  # seconds a server may take to become healthy
STARTUP_S = 600.0  # generous: a loaded 2-core machine takes minutes, an idle one seconds

Signal = tuple[Callable[[int, int], None], int]
# how a group is asked to stop before SIGKILL: the whole group, politely then firmly
GROUP_STOP: Sequence[Signal] = ((os.killpg, signal.SIGTERM), (os.killpg, signal.SIGINT))


def startup_timeout() -> float:
    """How long any server we start (stack services, test servers) may take to start."""
    raw = os.environ.get(STARTUP_VAR, "")
    try:
        return float(raw) if raw else STARTUP_S
    except ValueError:
        raise StackError(f"{STARTUP_VAR}={raw!r}: expected a number of seconds") from None


def as_user(user: struct_passwd | None) -> dict[str, Any]:
    """`subprocess` arguments that run a child as `user` (None: as ourselves)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@dataclass(frozen=True)
class Supervisor:
    run_dir: Path

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    def state(self) -> dict[str, Any]:
        """What the last save wrote ({} if nothing readable)."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def pids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.state().get("pids", {}).items()}

    def save(self, pids: Mapping[str, int], about: Mapping[str, Any]) -> None:
        """The PIDs and what the stack says of itself (how it was started, its URLs)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"pids": dict(pids), **about}
        self.state_file.write_text(json.dumps(state, indent=1))

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def launch(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        user: struct_passwd | None = None,
    ) -> subprocess.Popen[bytes]:
        """`argv` in a process group of its own, its output appended to its log."""
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            return subprocess.Popen(
                argv,
                env=dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **as_user(user),
            )

    def wait_healthy(
        self, name: str, healthy: Callable[[], bool], proc: subprocess.Popen[bytes]
    ) -> None:
        limit = startup_timeout()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with status {proc.returncode} while starting; see "
                    f"{self.log(name)}:\n{tail(self.log(name))}"
                )
            if healthy():
                return
            time.sleep(0.5)
        raise StackError(
            f"{name} was not healthy after {limit:.0f} s; see {self.log(name)} (on a busy "
            f"machine raise {STARTUP_VAR})"
        )

    def stop(self, pid: int, grace: float = 15.0, ask: Sequence[Signal] = GROUP_STOP) -> bool:
        """Ask with `ask`'s signals in turn, each given `grace` seconds, then SIGKILL the group;
        False when it was not running."""
        if not alive(pid):
            return False
        for send, sig in [*ask, (os.killpg, signal.SIGKILL)]:
            try:
                send(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.2)
            if not alive(pid):
                break
        return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
