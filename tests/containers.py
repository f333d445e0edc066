"""A real container engine for the container test, with no registry: Debian's Docker engine
(`docker.io`, dockerd) on a private socket, a base image made from Debian in place of
`python:3.11-slim-bookworm`, the test stand-ins of the third-party images (docker/standins/) and
our own images built from docker/*.Dockerfile unchanged.

Every network the engine makes takes its addresses from 198.19.0.0/16 (inside 198.18.0.0/15,
the range this project's tests use); nothing is published beyond loopback. The engine keeps its
layers in ENGINE_ROOT between runs (a rebuild is then a cache hit), and a clean machine builds
everything (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
STANDINS = DOCKER / "standins"
ENGINE_ROOT = Path(os.environ.get("AGEGENDER_ENGINE_ROOT", "/var/tmp/agegender-engine"))
EXEC_ROOT = Path("/run/agegender-engine")  # short: containerd's sockets live under it
BRIDGE = "198.19.0.1/24"  # the default bridge (builds)
POOL = "198.19.0.0/16"  # every network the engine creates, /24 each
BASE = "agegender-standin/base:bookworm"
PYTHON_BASE = "python:3.11-slim-bookworm"  # what our Dockerfiles start FROM
MIRROR = os.environ.get("AGEGENDER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The worker image's CPU variant in CI: the local CPU wheel of torch, not PyPI's CUDA build
# (5.8 GB of a 7.1 GB image); torchvision's release for that torch.
CPU_TORCH_WHEELS = Path(os.environ.get("AGEGENDER_CPU_WHEELS", "/opt/wheels"))
CPU_TORCH = {"TORCH_VERSION": "2.13.0", "TORCHVISION_VERSION": "0.28.0"}
# tags compose.yaml names, and where their stand-ins come from
STANDIN_IMAGES = {
    "postgres:16": "postgres.Dockerfile",
    "chrislusf/seaweedfs:4.48": "seaweedfs.Dockerfile",
    "prefecthq/prefect:3.9.1-python3.11": "prefect.Dockerfile",
}


class EngineError(RuntimeError):
    pass


class Engine:
    """dockerd on its own socket, data root and exec root; `stop` ends it whatever happens."""

    def __init__(self, root: Path = ENGINE_ROOT) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.log = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host}

    def start(self, timeout: float = 180) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not Path(dockerd).exists():
            raise EngineError("dockerd is not installed: .ci/run installs Debian's docker.io")
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        self.sock.unlink(missing_ok=True)
        cmd = [
            dockerd,
            f"--host={self.host}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={EXEC_ROOT}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--bip={BRIDGE}",
            f"--default-address-pool=base={POOL},size=24",
            "--containerd-namespace=agegender-test",
            "--containerd-plugins-namespace=agegender-test-plugins",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd exited ({self.proc.returncode}):\n{self._tail()}")
            if self.sock.exists():
                with contextlib.suppress(Exception):
                    self.client().ping()
                    return
            time.sleep(0.5)
        raise EngineError(f"dockerd did not answer on {self.sock} in {timeout:.0f} s")

    def _stop_stale(self) -> None:
        """A dockerd left by a test run that was killed outright holds the data root."""
        pidfile = self.root / "dockerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if "dockerd" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                os.kill(pid, signal.SIGTERM)
                for _ in range(120):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.5)

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.host, timeout=600)  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Containers first (so that none outlives the test), then the daemon and its
        containerd; SIGKILL to the whole group if it does not end in a minute."""
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for c in self.client().containers.list(all=True):
                c.remove(force=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def _tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def has_image(client: Any, tag: str) -> bool:
    import docker

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def make_base(client: Any, work: Path) -> float:
    """The stand-in of python:3.11-slim-bookworm: Debian bookworm (minbase) with its Python 3.11
    (`python` on PATH, venv), the host's CA certificates (the registries are reached through
    this machine's egress proxy), wget (SeaweedFS's health check) and a pip that trusts them
    and finds the local CPU wheel of torch. Returns seconds spent (0 when it exists)."""
    if has_image(client, BASE):
        client.images.get(BASE).tag(PYTHON_BASE)
        return 0.0
    t0 = time.monotonic()
    wheels = sorted(CPU_TORCH_WHEELS.glob(f"torch-{CPU_TORCH['TORCH_VERSION']}+cpu-cp311-*.whl"))
    if not wheels:
        raise EngineError(
            f"no CPU wheel of torch {CPU_TORCH['TORCH_VERSION']} in {CPU_TORCH_WHEELS}"
        )
    root = work / "rootfs"
    packages = "python3,python3-venv,ca-certificates,wget"
    run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", root, MIRROR])
    certs = root / "usr/local/share/ca-certificates"
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(crt, certs / crt.name)
    run(["chroot", root, "update-ca-certificates"])
    (root / "usr/local/bin/python").symlink_to("/usr/bin/python3")
    (root / "opt/standin-wheels").mkdir(parents=True)
    shutil.copy(wheels[-1], root / "opt/standin-wheels" / wheels[-1].name)
    (root / "etc/pip.conf").write_text(
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nfind-links = /opt/standin-wheels\n"
    )
    run(["chroot", root, "apt-get", "clean"])
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        'LABEL org.agegender.standin="python:3.11-slim-bookworm, made from Debian by the test"',
        'CMD ["python3"]',
    ]
    repo, tag = BASE.split(":")
    client.api.import_image(src=str(archive), repository=repo, tag=tag, changes=changes)
    client.images.get(BASE).tag(PYTHON_BASE)
    shutil.rmtree(root, ignore_errors=True)
    archive.unlink()
    return time.monotonic() - t0


def run(cmd: list[Any], **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise EngineError(f"{' '.join(map(str, cmd))} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return res


def _ignore_patterns(dockerfile: Path, context: Path) -> list[str]:
    """What BuildKit would read: the file named after the Dockerfile, else the context's."""
    for path in (
        dockerfile.with_name(dockerfile.name + ".dockerignore"),
        context / ".dockerignore",
    ):
        if path.is_file():
            lines = path.read_text().splitlines()
            return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return []


def build(
    client: Any,
    dockerfile: Path,
    context: Path,
    tag: str,
    buildargs: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> float:
    """`docker build` of a Dockerfile as it is, through the engine's API (the classic builder:
    this engine has no BuildKit client), with the context BuildKit would send. Seconds spent."""
    from docker.utils.build import tar

    t0 = time.monotonic()
    rel = str(dockerfile.relative_to(context))
    ctx = tar(str(context), exclude=_ignore_patterns(dockerfile, context), dockerfile=(rel, None))
    lines: list[str] = []
    error = None
    for chunk in client.api.build(
        fileobj=ctx,
        custom_context=True,
        dockerfile=rel,
        tag=tag,
        buildargs=dict(buildargs or {}),
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "stream" in chunk:
            lines.append(chunk["stream"])
        if "error" in chunk:
            error = chunk["error"]
    text = "".join(lines)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    if error is not None:
        raise EngineError(f"building {tag} from {dockerfile.name} failed: {error}\n{text[-3000:]}")
    return time.monotonic() - t0


def build_all(client: Any, logs: Path) -> dict[str, float]:
    """Every image compose.yaml names: stand-ins for the third-party ones, ours from our
    Dockerfiles (the worker as its CPU variant). Seconds per image."""
    with tempfile.TemporaryDirectory(dir=ENGINE_ROOT) as work:
        took = {PYTHON_BASE: make_base(client, Path(work))}
    for tag, name in STANDIN_IMAGES.items():
        took[tag] = build(client, STANDINS / name, STANDINS, tag, log=logs / f"{name}.log")
    took["agegender-mlflow:latest"] = build(
        client,
        DOCKER / "mlflow.Dockerfile",
        REPO,
        "agegender-mlflow:latest",
        log=logs / "mlflow.log",
    )
    took["agegender-worker:latest"] = build(
        client,
        DOCKER / "worker.Dockerfile",
        REPO,
        "agegender-worker:latest",
        CPU_TORCH,
        log=logs / "worker.log",
    )
    # the worker's instructions first, word for word, with its build arguments: its layers again
    took["agegender-serve:latest"] = build(
        client,
        DOCKER / "serve.Dockerfile",
        REPO,
        "agegender-serve:latest",
        CPU_TORCH,
        log=logs / "serve.log",
    )
    return took


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    e = Engine()
    try:
        e.start()
        yield e
    finally:
        e.stop()
