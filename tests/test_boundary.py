"""The library's import boundary, checked in a fresh interpreter (this one already holds pytest's
and the fixtures' imports): `agegender` never loads orchestration or tracking code, and
training, caching and prediction never load the synthetic-data generators."""

from __future__ import annotations

import ast
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
        "serving": ("serving.app", ("prefect", "tasks", "flows")),
    }
    for room, (reached, forbidden) in rooms.items():
        loaded = _modules_after(_EVERY_MODULE.format(package=room))
        assert reached in loaded
        assert [m for m in loaded if _under(m, forbidden)] == [], room


# The ops room's own rooms (ARCHITECTURE.md): each module of deployments/ and the modules of
# deployments/ it may import. The clients and the supervisor sit below everything that uses them,
# the stack and the `stack` command on top; no circle.
OPS_RULES: dict[str, set[str]] = {
    "services": set(),
    "mlflow_users": set(),  # also run alone, as a script, in compose's MLflow image
    "relay": set(),  # also run alone, as a script, in compose's front doors (MLflow image)
    "prefect_api": {"services"},
    "s3": {"services"},
    "credentials": {"services"},
    "supervisor": {"services"},
    "postgres": {"services", "supervisor"},
    "automations": {"prefect_api"},
    "pools": {"prefect_api", "services"},
    "schedules": {"prefect_api"},
    "layout": {"automations", "credentials", "postgres", "services"},
    "commands": {"credentials", "layout", "postgres", "services"},
    "provision": {"automations", "commands", "pools", "prefect_api", "schedules", "services"},
}
OPS_RULES["stack"] = set(OPS_RULES)
OPS_RULES["cli"] = set(OPS_RULES)
# servers' own helpers and the clients: the standard library only (they run in any process)
OPS_STDLIB_ONLY = (
    "services",
    "mlflow_users",
    "relay",
    "prefect_api",
    "credentials",
    "supervisor",
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, wherever in it (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def ops_graph(root: Path = ROOT / "deployments") -> dict[str, set[str]]:
    """deployments' modules -> the modules of deployments/ each imports."""
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        imported = _imports(root / f"{name}.py")
        graph[name] = {m.split(".")[1] for m in imported if m.startswith("deployments.")} & names
    return graph


def ops_problems(graph: dict[str, set[str]]) -> list[str]:
    """Each import the rules forbid, each module without a rule, and each circle."""
    problems = [f"{m}: no rule (add it to OPS_RULES)" for m in graph if m not in OPS_RULES]
    for module, uses in sorted(graph.items()):
        problems += [f"{module} imports {u}" for u in sorted(uses - OPS_RULES.get(module, set()))]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for u in sorted(graph.get(m, ())):
            if state.get(u) == 1:
                problems.append("circle: " + " -> ".join([*path[path.index(u) :], u]))
            elif u not in state:
                visit(u, [*path, u])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return problems


def test_the_ops_room_imports_only_down_and_has_no_circle() -> None:
    graph = ops_graph()
    assert set(graph) == set(OPS_RULES), "every module of deployments/ has its rule"
    assert ops_problems(graph) == []
    for name in OPS_STDLIB_ONLY:
        for m in _imports(ROOT / "deployments" / f"{name}.py"):
            top = m.split(".")[0]
            assert top in sys.stdlib_module_names or m.startswith("deployments"), (name, m)


def test_the_ops_rules_catch_a_circle_and_an_import_upwards() -> None:
    """The check above, shown to fail: the client reaching up into the stack (the circle this
    room once had, automations <-> stack, in its new form) and a module nobody placed."""
    graph = ops_graph()
    graph["automations"] = graph["automations"] | {"stack"}
    graph["newcomer"] = set()
    problems = ops_problems(graph)
    assert "automations imports stack" in problems
    assert "newcomer: no rule (add it to OPS_RULES)" in problems
    circles = [p for p in problems if p.startswith("circle: ")]
    assert circles, problems
    assert all("automations" in c and "stack" in c for c in circles), problems
