"""Process supervision for the native stack: each service in its own process group, its PID in
`RUN_DIR/stack.json`, its output in `RUN_DIR/logs/NAME.log`; started services are waited for
by their health check (never a fixed sleep) and stopped by exactly the group we started. The
run dir holds databases, passwords and logs: it and what its servers write are their user's
alone (`make_private`, `PRIVATE_UMASK`).

Weighed against supervisord and friends: they bring a daemon of their own, a config format and
an RPC port to secure, and still need our health checks and PostgreSQL's user switch; this
file is what the stack needs and no more."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
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


# what a server we start writes is its user's alone: databases (with the worker's MLflow
# password in the GPU deployment's job variables), its data, our logs
PRIVATE_UMASK = 0o077


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
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = {"pids": dict(pids), **about}
        with private_file(self.state_file, os.O_TRUNC) as f:
            f.write(json.dumps(state, indent=1).encode())

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def launch(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        user: struct_passwd | None = None,
        umask: int = PRIVATE_UMASK,
    ) -> subprocess.Popen[bytes]:
        """`argv` in a process group of its own, its output appended to its log (0600), what
        it writes under `umask` (-1: ours)."""
        self.log(name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with private_file(self.log(name), os.O_APPEND) as log:
            return subprocess.Popen(
                argv,
                env=dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=umask,
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


def private_file(path: Path, flags: int) -> io.BufferedWriter:
    """`path` opened for writing (binary), created 0600: it may say what its server logs."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600), "wb")


def make_private(root: Path, group: int | None = None, walk: bool = True) -> int:
    """`root` and everything under it closed to other users: group and other bits off each
    folder and file (links are not followed), for what an older version left open. `group`:
    the one group that may pass through `root` itself (PostgreSQL's, when it runs as another
    user). `walk=False`: `root` alone (what PRIVATE_UMASK creates inside is private already).
    Returns how many were open to others."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if group is not None and root.stat().st_gid != group:
        os.chown(root, -1, group)
    paths = [
        os.path.join(folder, name)
        for folder, folders, files in (os.walk(root) if walk else ())
        for name in [*folders, *files]
    ]
    changed = 0
    for path in [str(root), *paths]:  # a server may remove one meanwhile
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue  # links, sockets (PostgreSQL's): nothing to read through them
        mode = stat.S_IMODE(st.st_mode)
        want = mode & ~0o077 | (0o010 if path == str(root) and group is not None else 0)
        if mode == want:
            continue
        try:
            os.chmod(path, want)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise StackError(
                f"{path} is open to other users (mode {mode:04o}) and not ours to change; run "
                f"`chmod -R go-rwx {root}` as its owner"
            ) from None
        changed += bool(mode & ~want)  # closed (not PostgreSQL's group let through)
    return changed


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
