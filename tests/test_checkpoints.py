"""Checkpoints are loaded with `weights_only=True`: a tampered model file cannot run code."""

from __future__ import annotations

import base64
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pytest
import torch

from agegender.cache import build_cache
from agegender.config import CacheConfig, load_config
from agegender.models import build_model
from agegender.predict import Predictor
from agegender.synth.adience import SynthResult
from agegender.train import RunError, adience_fold, load_backbone, train, train_fold
from tests.conftest import run_cli

TINY = ["data.crop=48", "train.iterations=2", "train.tencrop=false"]


class Touch:
    """Unpickled, it creates `marker`: what a tampered checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def run(small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) fold run: its best.pt and last.pt as training writes them."""
    root = tmp_path_factory.mktemp("ckpt")
    build_cache(small_synth.out, root / "cache", config=CacheConfig(image_size=56, workers=1))
    return train_fold(root / "cache", 0, load_config(None, TINY), root / "run").out_dir


def _tamper(src: Path, dst: Path, marker: Path) -> Path:
    """`src` with one more entry that runs a command when unpickled (made from our own file,
    so loading it unsafely here is fine)."""
    obj = torch.load(src, weights_only=False)
    obj["trojan"] = Touch(marker)
    torch.save(obj, dst)
    return dst


def test_checkpoints_hold_only_tensors_and_plain_data(run: Path) -> None:
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run / name) == [], name


def test_a_checkpoint_that_pickles_code_is_refused(
    run: Path, small_synth: SynthResult, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    best = _tamper(run / "best.pt", tmp_path / "best.pt", marker)
    # registry models, `agegender predict` and the pyfunc model load through Predictor
    with pytest.raises(RunError, match=r"best.pt: refused to load: .* pickles posix.system"):
        Predictor.load(best, "cpu")
    # a pretrained backbone (suite.pretrained / model.init_from)
    config = load_config(None, TINY)
    model = build_model("multitask", 48, config.model)
    with pytest.raises(RunError, match=r"model.init_from=.*refused to load"):
        load_backbone(model, best)
    # a run's last.pt, on resume
    cache = run.parent / "cache"
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    _tamper(run / "last.pt", resumed / "last.pt", marker)
    from agegender.cache import open_cache

    with pytest.raises(RunError, match=r"last.pt: refused to load"):
        train(adience_fold(open_cache(cache), 0, config), config, resumed, resume=True)
    # the command line: one error line, no traceback
    image = next(small_synth.out.glob("aligned/*/*.jpg"))
    res = run_cli("predict", image, "--no-detect", "--model", best)
    assert res.returncode == 2
    assert res.stderr.startswith("error: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert "refused to load" in res.stderr
    assert not marker.exists()
    # and the file really is malicious: an unsafe load runs its command
    torch.load(best, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_with_numpy_statistics_still_loads(run: Path, tmp_path: Path) -> None:
    """best.pt files written before the statistics were tensors (float32 numpy arrays)."""
    new = torch.load(run / "best.pt", weights_only=True)
    old = dict(new, normalize={"mean": np.asarray(new["normalize"]["mean"]), "std": None})
    torch.save(old, tmp_path / "old.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")
    images = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    want = Predictor.load(run / "best.pt", "cpu").probabilities(images)
    got = Predictor.load(tmp_path / "old.pt", "cpu").probabilities(images)
    assert want.keys() == got.keys()
    for head in want:
        np.testing.assert_array_equal(want[head], got[head])
    # an object array is not a float array: refused
    old["normalize"]["mean"] = np.array([object()], dtype=object)
    torch.save(old, tmp_path / "objects.pt")
    with pytest.raises(RunError, match="refused to load"):
        Predictor.load(tmp_path / "objects.pt", "cpu")


@pytest.mark.integration
def test_a_registered_pyfunc_model_loads_and_a_tampered_one_is_refused(
    run: Path, small_synth: SynthResult, tmp_path: Path
) -> None:
    """What `mlflow models serve` does with a registered champion: its pyfunc model loads the
    checkpoint inside it through the same safe loader."""
    import mlflow.pyfunc

    from tracking.store import Tracker

    tracker = Tracker("checkpoints", tmp_path / "runs")
    marker = tmp_path / "pwned"
    tampered = _tamper(run / "best.pt", tmp_path / "best.pt", marker)
    uris = {}
    for name, checkpoint in (("good", run / "best.pt"), ("tampered", tampered)):
        run_id = tracker.start(name, {})
        model_id = tracker.log_pyfunc(run_id, checkpoint, "model", {})
        version = tracker.register(run_id, "model", f"ckpt-{name}", {}, None, model_id)
        uris[name] = f"models:/ckpt-{name}/{version}"
    model = mlflow.pyfunc.load_model(str(tracker.download(uris["good"], tmp_path / "good")))
    image = next(small_synth.out.glob("aligned/*/*.jpg")).read_bytes()
    request = pd.DataFrame({"image": [base64.b64encode(image).decode()], "detect": [False]})
    (row,) = model.predict(request)
    assert row["status"] == "whole image", row
    assert row["gender"] in ("m", "f"), row
    with pytest.raises(RunError, match="refused to load"):
        mlflow.pyfunc.load_model(str(tracker.download(uris["tampered"], tmp_path / "bad")))
    assert not marker.exists()
