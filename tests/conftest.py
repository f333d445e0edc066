"""Fixtures: the real Adience metadata from ../shared (never committed), small synthetic sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.cache import build_cache
from agegender.config import CacheConfig
from agegender.sources import write_synthetic_source
from agegender.synthetic import SynthResult, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGEGENDER_SHARED", REPO.parent / "shared")) / "adience"


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.skip(
            f"real Adience {sub} not found at {path}: these files are not part of the repository; "
            "put the shared/ folder beside the checkout (or set AGEGENDER_SHARED) to run this test"
        )
    return path


@pytest.fixture(scope="session")
def real_metadata() -> Path:
    return _shared("metadata")


@pytest.fixture(scope="session")
def lh_lists() -> Path:
    return _shared("levi_hassner_folds")


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """A small synthetic Adience download (5 folds x 24 rows, 64 px), shared read-only by tests."""
    return write_synthetic(
        tmp_path_factory.mktemp("synth"), size=64, per_fold=24, seed=3, workers=1
    )


@pytest.fixture(scope="session")
def learn_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set big enough to learn from: 5 x 400 rows, 56 px cache (48 px crops)."""
    root = tmp_path_factory.mktemp("learn")
    write_synthetic(root / "adience", size=72, per_fold=400, seed=11)
    build_cache(root / "adience", root / "cache", config=CacheConfig(image_size=56))
    return root / "cache"


@pytest.fixture(scope="session")
def synth_celeba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA download (160 images, 48 x 59 px), shared read-only by tests."""
    root = tmp_path_factory.mktemp("celeba")
    write_synthetic_source("celeba", root, n=160, size=48, seed=7)
    return root


@pytest.fixture(scope="session")
def synth_utkface(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic UTKFace download (160 images, 48 px), shared read-only by tests."""
    root = tmp_path_factory.mktemp("utkface")
    write_synthetic_source("utkface", root, n=160, size=48, seed=7)
    return root


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed `agegender` console script, as a user runs it."""
    script = Path(sys.executable).with_name("agegender")
    assert script.is_file(), f"{script}: console script not installed (run `make venv`)"
    cmd = [str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
