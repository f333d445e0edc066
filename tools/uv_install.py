"""`pip install ARGS` done by uv (several times faster for torch's ~6 GB of CUDA wheels), with
pip's own configuration: uv reads `UV_*` and its flags, never pip.conf or `PIP_*`, so the index,
extra indexes, find-links and constraints that `pip config list` shows are passed on as flags.

    python tools/uv_install.py torch==2.14.1 ...      # into this interpreter's environment

Without uv (not installable here), it runs pip itself with the same arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys

# pip setting -> uv flag; values may list several, separated by spaces
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
RANK = {"global": 0, "install": 1, ":env:": 2}  # later wins, as in pip


def pip_settings() -> dict[str, str]:
    """pip's effective settings that uv must honour, from `pip config list`."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    )
    best: dict[str, tuple[int, str]] = {}
    for line in res.stdout.splitlines():
        name, sep, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if not sep or scope not in RANK:
            continue
        value = value.strip().strip("'\"")
        if key not in best or RANK[scope] >= best[key][0]:
            best[key] = (RANK[scope], value)
    return {k: v for k, (_, v) in best.items()}


def uv_flags(settings: dict[str, str]) -> list[str]:
    flags: list[str] = []
    for key, flag in FLAGS.items():
        for value in settings.get(key, "").split():
            flags += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    if "extra-index-url" in settings or "find-links" in settings:
        flags += ["--index-strategy", "unsafe-best-match"]  # pip's rule: best version anywhere
    return flags


def main(args: list[str]) -> int:
    try:
        from uv import find_uv_bin
    except ImportError:
        return subprocess.call([sys.executable, "-m", "pip", "install", *args])
    # Bytecode now, as pip writes it: uv leaves none, and where PYTHONDONTWRITEBYTECODE is set
    # (this machine, CI) every process compiled torch, MLflow and Prefect from source again
    cmd = [find_uv_bin(), "pip", "install", "--python", sys.executable, "--compile-bytecode"]
    settings = pip_settings()
    env = os.environ | {"UV_NO_PROGRESS": "1"}
    if "cert" in settings:
        env.setdefault("SSL_CERT_FILE", settings["cert"])
    return subprocess.call([*cmd, *uv_flags(settings), *args], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
