"""The benchmarks must keep running; their figures go in notes, never into assertions on speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# script, tiny-size arguments, lines its output must have (tracking_outage.py's smoke run is
# test_tracking_outage's server-kill test: the same folds and figures, one server for both)
BENCHMARKS = [
    ("prepare.py", "--images 40 --size 160", ["naive PIL loop", "ratio"]),
    (
        "train_throughput.py",
        "--crop 48 --image-size 56 --iterations 2 --per-fold 16 --batch-size 8",
        ["model-only bound", "ratio", "step eager"],
    ),
    (
        "convergence.py",
        "--per-fold 24 --image-size 56 --crop 48 --iterations 6 --decay-every 3 --compare std "
        "--determinism 2",
        ["paper: test after 6 iterations", "std: test after", "identical: True", "summary"],
    ),
    (
        "normalise_crops.py",
        "--image-size 40 --crop 32 --images 60 --batches 2",
        ["normalise-then-crop", "identical True"],
    ),
    (
        "calibrate_detect.py",
        "--faces 20 --repeat 1",
        ["image side / box side: median", "detect 4000x3000"],
    ),
    (
        "slots.py",
        "--crop 48 --image-size 56 --iterations 2 --per-fold 16 --batch-size 8 --repeat 1",
        ["two folds at once", "ratio"],
    ),
    (
        "predict.py",
        "--photos 4 --width 320 --height 240 --crop 48 --image-size 56",
        ["baseline: one photo, one face at a time", "ratio"],
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(("script", "args", "expected"), BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs(script: str, args: str, expected: list[str]) -> None:
    cmd = [sys.executable, f"benchmarks/{script}", *args.split()]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    for line in expected:
        assert line in res.stdout, res.stdout


@pytest.mark.integration
def test_device_check_smoke(tmp_path: Path) -> None:
    """The prepared GPU script, at tiny sizes on the CPU (SMOKE=1): every step runs and leaves
    its figures. One arm of the K table is made to die at its first K (GPU_SUITE_CRASH): its row
    says so, the arm starts again for the next K, and the other arm is untouched. This is also
    the CPU run of gpu_suite.py (eager and graph arms), train_throughput.py's graph step,
    convergence.py in fp32 and bf16, projection.py and suite_wall.py."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMOKE": "1", "PY": sys.executable, "OUT": str(out), "WORK": str(work)}
    env |= {"BUDGET": "1500", "GPU_SUITE_CRASH": "graph:1"}
    res = subprocess.run(
        ["bash", "benchmarks/device_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [
        "synth",
        "cache",
        "table",
        "folds",
        "projection",
        "ratio",
        "suite",
    ]
    assert all(s["exit"] == 0 for s in steps), steps
    rows = [json.loads(line) for line in (out / "gpu_rows.jsonl").read_text().splitlines()]
    got = {(r["step"], r["folds"]): "error" if "error" in r else r["ran_as"] for r in rows}
    assert got == {
        ("eager", 1): "eager",
        ("eager", 2): "eager",
        ("graph", 1): "error",
        ("graph", 2): "graph",
    }
    table = json.loads((out / "gpu_suite.json").read_text())
    assert len(table["rows"]) == 3
    assert all(r["img_per_s"] > 0 for r in table["rows"])
    for precision in ("fp32", "bf16"):
        fold = json.loads((out / f"paper_{precision}.json").read_text())["runs"][0]
        assert fold["precision"] == precision
        assert fold["step"] == "graph step, op by op (no CUDA)"
        assert 0 < fold["train_seconds"] < fold["seconds"]
        assert set(fold["test"]) >= {"age_acc", "gender_acc", "age_acc_10crop"}
    projected = json.loads((out / "projection.json").read_text())
    assert [p["precision"] for p in projected] == ["fp32"]  # the table measured fp32 only
    assert projected[0]["total_min"] > projected[0]["training_min"] > 0
    log = (out / "device_check.log").read_text()
    assert "step graph, images preloaded True" in log
    assert "ratio            :" in log
    suite = json.loads((out / "suite_runs.json").read_text())
    assert len(suite["folds"]) == 4
    assert suite["suite_wall_s"] > suite["training_sum_s"] > 0
