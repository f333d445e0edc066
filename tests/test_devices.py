"""Where a fold trains: a CUDA device asked for and missing is one clear error (never a silent
CPU run); only `train.device=auto` falls back to the CPU, and the run's MLflow tags say so.
This machine has no GPU, which is exactly the case these tests need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.schemas.objects import State

from agegender.config import Config, TrainConfig
from agegender.train import DeviceError
from tasks.folds import FoldJob
from tasks.slots import fold_device
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

TINY = [
    "data.crop=48",
    "train.iterations=2",
    "model.norm=batchnorm",
    "optim.name=adam",
    "optim.weight_decay=0",
    "train.patience=null",
    "train.tencrop=false",
]


def _one_fold_suite(cache: Path, run_root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`agegender suite` on fold 0 of the single-task age variant, at tiny size."""
    return run_cli(
        *("suite", "--cache", cache, "--run-root", run_root),
        *("suite.variants=[age]", "suite.folds=[0]", *extra, *TINY),
    )


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_suite_asked_for_cuda_without_one_stops_with_one_line(
    learn_cache: Path, tmp_path: Path, device: str
) -> None:
    res = _one_fold_suite(learn_cache, tmp_path, f"train.device={device}")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith(f"error: train.device={device}, but this machine ")
    assert "has no CUDA device" in errors[0]
    assert "train.device=auto runs on the CPU" in errors[0]
    assert not list(tmp_path.rglob("result.json"))  # nothing trained on the CPU instead


def test_pretraining_asked_for_cuda_without_one_stops_with_one_line(
    synth_celeba: Path, tmp_path: Path
) -> None:
    res = run_cli(
        "pretrain",
        "--source",
        "celeba",
        "--data-root",
        synth_celeba,
        "--run-root",
        tmp_path,
        "train.device=cuda",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: train.device=cuda, but this machine ")


def test_the_gpu_deployment_requires_cuda() -> None:
    """A fold flow run of `train-fold-gpu` in a container without a GPU fails at once: the
    deployment's `device: cuda` overrides the job's `auto`, and the check comes before any
    Prefect call or training (so the flow's function is called directly here), as bad input:
    the flow run fails with `bad input: ...`, which the suite reports instead of retrying."""
    from flows.fold import train_fold_flow

    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    gpu = next(d for d in doc["deployments"] if d["name"] == "train-fold-gpu")
    assert gpu["parameters"] == {"device": "cuda"}
    job = FoldJob(
        cache_dir="/nonexistent",
        fold=0,
        variant="age",
        config=Config(train=TrainConfig(device="auto")),
        run_root="/nonexistent",
        suite="s",
        parent_id="p",
    )
    state = train_fold_flow.fn(job, **gpu["parameters"])
    assert isinstance(state, State)
    assert state.is_failed(), state
    message = str(state.message)
    assert re.fullmatch(r"bad input: train.device=cuda, but this machine .* no CUDA.*", message)


def test_fold_device_only_lets_auto_fall_back() -> None:
    assert fold_device("auto", "cpu") == ("cpu", "cpu: auto found no CUDA device")
    assert fold_device("cpu", "cpu") == ("cpu", None)
    for asked in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=f"train.device={asked}, "):
            fold_device(asked, "cpu")


def test_auto_falls_back_to_the_cpu_and_the_run_says_so(learn_cache: Path, tmp_path: Path) -> None:
    res = _one_fold_suite(
        learn_cache, tmp_path, "suite.register_champions=false", "train.device=auto"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("agegender")
    assert experiment is not None
    (fold,) = client.search_runs([experiment.experiment_id], "tags.kind = 'fold'")
    tags = fold.data.tags
    assert tags["device_requested"] == "auto"
    assert tags["device"] == "cpu"
    assert tags["device_fallback"] == "cpu: auto found no CUDA device"
