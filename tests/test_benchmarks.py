"""The benchmarks must keep running; their figures go in notes, never into assertions on speed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

# script, tiny-size arguments, lines its output must have
BENCHMARKS = [
    ("prepare.py", "--images 40 --size 160", ["naive PIL loop", "ratio"]),
    (
        "train_throughput.py",
        "--crop 48 --image-size 56 --iterations 2 --per-fold 16 --batch-size 8",
        ["model-only bound", "ratio"],
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
        "gpu_suite.py",
        "--crop 48 --image-size 56 --per-fold 40 --iterations 3 --warmup 1 --folds-at-once 1 2 "
        "--check-sync --fold-batch",
        [" threads  |             2 |", " batched  |             2 |", "syncs inside a step: not"],
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
