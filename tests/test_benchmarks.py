"""The benchmarks must keep running; their figures go in notes, never into assertions on speed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.integration
def test_prepare_benchmark_runs() -> None:
    cmd = [sys.executable, "benchmarks/prepare.py", "--images", "40", "--size", "160"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "naive PIL loop" in res.stdout
    assert "ratio" in res.stdout


@pytest.mark.integration
def test_train_throughput_benchmark_runs() -> None:
    cmd = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--crop",
        "48",
        "--image-size",
        "56",
        "--iterations",
        "2",
        "--per-fold",
        "16",
        "--batch-size",
        "8",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "model-only bound" in res.stdout
    assert "ratio" in res.stdout


@pytest.mark.integration
def test_calibrate_detect_benchmark_runs() -> None:
    cmd = [sys.executable, "benchmarks/calibrate_detect.py", "--faces", "20", "--repeat", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "image side / box side: median" in res.stdout
    assert "detect 4000x3000" in res.stdout


@pytest.mark.integration
def test_predict_benchmark_runs() -> None:
    cmd = [sys.executable, "benchmarks/predict.py", "--photos", "4", "--width", "320"]
    cmd += ["--height", "240", "--crop", "48", "--image-size", "56"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "baseline: one photo, one face at a time" in res.stdout
    assert "ratio" in res.stdout
