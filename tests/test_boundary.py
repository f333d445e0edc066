"""The library's import boundary, checked in a fresh interpreter (this one already holds pytest's
and the fixtures' imports): `agegender` never loads orchestration or tracking code, and
training, caching and prediction never load the synthetic-data generators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "mlflow", "tasks", "flows", "deployments", "tracking")

_EVERY_MODULE = """
import importlib, pkgutil
import {package}
for info in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(info.name)
"""


def _modules_after(code: str) -> list[str]:
    """Every name in sys.modules after `code` runs in a new interpreter at the repository root."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout.splitlines()[-1]))


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_library_imports_no_orchestration_or_tracking() -> None:
    loaded = _modules_after(_EVERY_MODULE.format(package="agegender"))
    library = [m for m in loaded if _under(m, ("agegender",))]
    # the walk reached the whole package, subpackages included
    assert {"agegender.cli", "agegender.train", "agegender.synth.faces"} <= set(library)
    assert [m for m in loaded if _under(m, FORBIDDEN)] == []


def test_training_caching_and_prediction_load_no_synthetic_data_code() -> None:
    users = ("agegender.train", "agegender.cache", "agegender.predict", "agegender.pretrain")
    loaded = _modules_after("import " + ", ".join(users))
    assert set(users) <= set(loaded)
    assert [m for m in loaded if _under(m, ("agegender.synth",))] == []


def test_each_orchestration_room_imports_only_the_rooms_below_it() -> None:
    """ARCHITECTURE.md's table: tracking knows no Prefect, tasks no flows, and the ops room
    (deployments) none of tracking, tasks or flows."""
    rooms = {  # room: (a module the walk must reach, what it must not load)
        "tracking": ("tracking.store", ("prefect", "tasks", "flows")),
        "tasks": ("tasks.folds", ("flows",)),
        "deployments": ("deployments.stack", ("tracking", "tasks", "flows", "mlflow")),
    }
    for room, (reached, forbidden) in rooms.items():
        loaded = _modules_after(_EVERY_MODULE.format(package=room))
        assert reached in loaded
        assert [m for m in loaded if _under(m, forbidden)] == [], room
