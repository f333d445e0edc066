"""The suite's scheduling on a CPU: folds at once share the cores (on 2 cores, two folds with one
thread each), and pretraining beside the folds that do not need its backbone (a faster demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agegender.cache import build_cache
from agegender.config import CacheConfig
from agegender.synth.adience import SynthResult
from tasks.slots import set_slots, slot
from tests.conftest import REPO

TINY = ["data.crop=48", "train.iterations=2", "train.tencrop=false", "model.norm=batchnorm"]


@pytest.fixture
def threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU slots only")
@pytest.mark.parametrize(("cores", "n", "each"), [(2, 1, 2), (2, 2, 1), (16, 2, 8), (2, 3, 1)])
def test_cpu_slots_share_the_cores(
    cores: int, n: int, each: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n folds at once get cores // n torch threads each (never fewer than one): they fit the
    cores without oversubscribing them, and one slot keeps every core."""
    import tasks.slots

    monkeypatch.setattr(tasks.slots, "CPU_THREADS", cores)
    assert set_slots(n) == n
    assert torch.get_num_threads() == each
    held = []
    for _ in range(n):
        cm = slot()
        held.append((cm, cm.__enter__()))
    assert [device for _, device in held] == ["cpu"] * n
    for cm, _ in held:
        cm.__exit__(None, None, None)


@pytest.mark.integration
def test_folds_that_need_no_backbone_do_not_wait_for_pretraining(
    small_synth: SynthResult, synth_celeba: Path, tmp_path: Path
) -> None:
    """Pretraining holds one slot while the from-scratch folds train in the other; before, every
    fold started only after pretraining had finished."""
    cache = tmp_path / "cache"
    build_cache(small_synth.out, cache, config=CacheConfig(image_size=56))
    run_root = tmp_path / "runs"
    cmd = [str(Path(sys.executable).with_name("agegender")), "suite", "--cache", str(cache)]
    cmd += ["--run-root", str(run_root), "suite.slots=2", "suite.image_size=56"]
    cmd += ["suite.variants=[multitask, multitask_pretrained]", "suite.folds=[0, 1]", *TINY]
    cmd += [f"suite.pretrain.root={synth_celeba}", "suite.pretrain.overrides=[train.iterations=24]"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TR"))}
    res = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 fold(s) trained" in res.stdout

    def finished(pattern: str) -> list[float]:
        return sorted(p.stat().st_mtime for p in run_root.glob(f"*/{pattern}/result.json"))

    (pretrained,) = finished("pretrain/*")
    scratch, from_backbone = finished("multitask/fold*"), finished("multitask_pretrained/fold*")
    assert len(scratch) == len(from_backbone) == 2
    assert scratch[0] < pretrained, "a from-scratch fold finished before pretraining did"
    assert from_backbone[0] > pretrained  # these need its weights


def test_a_slot_before_any_flow_set_them_is_an_error_not_a_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, an empty queue: a task run outside a flow that sets slots blocked forever."""
    import tasks.slots

    monkeypatch.setattr(tasks.slots, "_slots", None)
    with pytest.raises(tasks.slots.SlotsError, match="set_slots"), slot():
        pass
