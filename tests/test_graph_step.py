"""The graph step (`agegender.graph_step`: the whole step reading fixed tensors, replayed as one
CUDA graph on a GPU) trains what the eager loop trains. On a CPU it runs the very step a GPU
captures, op by op (`graph`) or compiled (`compiled`), so these tests check its numbers: the
input gather, masks, labels, learning rates and statistics read from the chunk buffers, the
short last batch of an epoch, resuming, and (compiled) the fused kernels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, ConfigError, load_config
from agegender.graph_step import GraphStep, compiled_step_loss, step_loss
from agegender.synth.adience import SynthResult
from agegender.train import Run, RunError, epoch_chunks, prepare_run, train_epoch, train_fold
from tests.conftest import REPO

# 86 training rows in fold 0: six steps of 16 an epoch, the last one short (6 rows); the rate
# drops by 10x at steps 4, 8 and 12 (Caffe's step policy), inside the chunks
TINY = ["data.crop=48", "data.batch_size=16", "train.iterations=13", "optim.decay_every=0.3"]


@pytest.fixture(scope="module")
def cache(small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("graph") / "cache"
    build_cache(small_synth.out, out, config=CacheConfig(image_size=56))
    return out


def _trained(
    cache: Path, step: str, preset: str, extra: tuple[str, ...] = ()
) -> tuple[Run, list[Any]]:
    config = load_config(None, [*TINY, f"train.step={step}", *extra], preset)
    run = prepare_run(open_cache(cache), 0, config)
    epochs = []
    while run.iteration < run.total:
        epochs.append(train_epoch(run))
    return run, epochs


def _assert_same_training(
    eager: tuple[Run, list[Any]], other: tuple[Run, list[Any]], atol: float
) -> None:
    (a, ea), (b, eb) = eager, other
    assert b.iteration == a.iteration == 13
    assert len(ea) == len(eb) == 3
    for x, y in zip(ea, eb, strict=True):
        for key in ("train_loss", "train_age_acc", "train_gender_acc"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=atol, msg=name)
    # the scheduler stands where the eager loop's per-step calls leave it
    assert b.scheduler.last_epoch == a.scheduler.last_epoch
    assert b.scheduler.get_last_lr() == pytest.approx(a.scheduler.get_last_lr())
    assert b.scheduler.get_last_lr()[0] < 1e-3 * b.config.optim.head_lr_mult  # it did drop


def test_graph_step_trains_what_the_eager_loop_trains(cache: Path) -> None:
    """The paper's net and solver (mean image, SGD, step schedule) through 13 steps: three
    epochs, short last batches, three rate drops, and a batch where a head has no label."""
    eager = _trained(cache, "eager", "paper")
    graph = _trained(cache, "graph", "paper")
    assert len(graph[0].data.train) % 16 != 0  # short last batches ran too (eagerly)
    assert (graph[0].mode, eager[0].mode) == ("graph", "eager")
    _assert_same_training(eager, graph, atol=1e-6)  # measured: 3.7e-9
    still, _ = _trained(cache, "graph", "paper", ("optim.lr=1e-9",))
    params = zip(graph[0].model.parameters(), still.model.parameters(), strict=True)
    assert max(float((p - q).detach().abs().max()) for p, q in params) > 1e-4  # it trained


def test_graph_step_with_batch_norm_and_adamw(cache: Path) -> None:
    """The modern preset: batch norm (its running statistics), AdamW, a cosine rate, per-channel
    standardisation. AdamW turns float noise in near-zero gradients (conv biases before a batch
    norm) into steps of ~lr, so its tolerance is wider: measured 4.8e-6."""
    _assert_same_training(
        _trained(cache, "eager", "modern"), _trained(cache, "graph", "modern"), atol=1e-4
    )


def test_a_graph_run_resumes_to_the_same_result(cache: Path, tmp_path: Path) -> None:
    """Killed after its second epoch's checkpoint, a graph-step run resumes to every number of
    one that was not (the checkpoint keeps the learning rates as numbers, not the step's
    tensors); and it says how its steps ran."""
    config = load_config(None, [*TINY, "train.step=graph", "train.iterations=20"])

    def crash(record: dict[str, Any]) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(cache, 0, config, tmp_path / "killed", log=crash)
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    eager = load_config(None, [*TINY, "train.step=eager", "train.iterations=20"])
    with pytest.raises(KeyboardInterrupt):
        train_fold(cache, 0, eager, tmp_path / "eager", log=crash)
    theirs = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)
    # the rates the next step takes, as numbers, as the eager loop saves them (here a rate drop
    # falls on the epoch's end: iteration 12 of 20, decay every 6)
    rates = [g["lr"] for g in state["optimizer"]["param_groups"]]
    assert state["iteration"] == 12
    assert rates == [g["lr"] for g in theirs["optimizer"]["param_groups"]]
    assert all(isinstance(r, float) for r in rates)
    assert rates[0] == pytest.approx(1e-3 * 10 * 0.01)  # heads: lr x head_lr_mult x 0.1^2
    resumed = train_fold(cache, 0, config, tmp_path / "killed", resume=True)
    straight = train_fold(cache, 0, config, tmp_path / "straight")
    assert resumed.test == straight.test
    history = [
        json.loads((tmp_path / d / "history.json").read_text()) for d in ("killed", "straight")
    ]
    for h in history:
        for epoch in h:
            epoch.pop("images_per_s")
    assert history[0] == history[1]
    assert straight.summary["step"] == "graph step, op by op (no CUDA)"
    assert straight.summary["precision"] == "fp32"


def test_step_settings_are_checked_and_not_hashed(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.step=compiled cannot promise"):
        load_config(None, ["train.step=compiled", "train.deterministic=true"])
    graph = load_config(None, ["train.step=graph"])
    assert graph.hash() == load_config(None, ["train.step=eager"]).hash()  # how, not what
    assert graph.hash() != load_config(None, ["train.precision=bf16"]).hash()
    # train.precision and train.step changed no hash: a last.pt or a finished fold from before
    # (paper preset; with train.bf16=true) is still this config's (hashes from 6cfb2f4)
    assert (graph.hash(), load_config(None, ["train.precision=bf16"]).hash()) == (
        "4cfff7eda38f",
        "2ffe3ac70ccd",
    )
    # configs saved before train.precision said train.bf16
    old = load_config().model_dump(mode="json")
    del old["train"]["precision"]
    old["train"]["bf16"] = True
    assert type(graph).model_validate(old).train.precision == "bf16"
    # a graph step needs the images in device memory (never preloaded: refused, by name)
    never = load_config(None, [*TINY, "train.step=graph", "data.preload=never"])
    with pytest.raises(RunError, match=r"train\.step=graph .*data\.preload=always"):
        prepare_run(open_cache(cache), 0, never)
    auto = load_config(None, [*TINY, "data.preload=never"])
    assert prepare_run(open_cache(cache), 0, auto).mode == "eager"  # on a CPU, always
    # deterministic with the graph step: the same numbers twice
    det = load_config(None, [*TINY, "train.step=graph", "train.deterministic=true"])
    a = train_fold(cache, 1, det, tmp_path / "a").test
    assert a == train_fold(cache, 1, det, tmp_path / "b").test


@pytest.mark.integration
def test_compiled_step_fuses_and_trains_what_the_eager_loop_trains(cache: Path) -> None:
    """torch.compile (Inductor; its C++ backend here, Triton on a GPU) fuses each ReLU, max-pool
    and LRN (shifted adds, power, division) into one kernel, each fc ReLU with its dropout
    multiply, and the input gather, crop, mean subtraction and layout into one; one step's loss
    and gradients equal the eager modules', and 13 compiled steps train what the eager loop
    trains. The first call compiles (about 20-50 s on two cores), once for the whole process."""
    run = prepare_run(open_cache(cache), 0, load_config(None, [*TINY, "train.step=compiled"]))
    engine = GraphStep(run, compiled=True)
    (chunk,) = list(epoch_chunks(run, 1))
    rows = engine._host(chunk, 0, 1, 16)
    k = torch.zeros(1, dtype=torch.long)

    def step(fn: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        run.model.zero_grad(set_to_none=True)
        loss, stats = fn(
            run.model, engine.images, engine.mean, engine.std, rows, k, None, **engine.options
        )
        loss.backward()
        return (
            loss.detach(),
            stats,
            [p.grad.clone() for p in run.model.parameters() if p.grad is not None],
        )

    (loss, stats, grads), code = run_and_get_code(step, compiled_step_loss())
    eager_loss, eager_stats, eager_grads = step(step_loss)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats, eager_stats)
    assert len(grads) == len(eager_grads) == 14  # every parameter
    for c, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    forward = sorted(set(re.findall(r"cpp_fused_\w+", code[0])))
    lrn = [k for k in forward if all(op in k for op in ("relu", "max_pool2d", "pow", "add", "div"))]
    dropout = [k for k in forward if all(op in k for op in ("relu", "mul", "div", "unbind"))]
    inputs = [k for k in forward if all(op in k for op in ("index", "flip", "sub", "permute"))]
    assert (len(lrn), len(dropout), len(inputs)) == (2, 2, 1), forward
    assert len(forward) <= 10, forward  # eager: ~40 elementwise and pooling ops

    eager, compiled = _trained(cache, "eager", "paper"), _trained(cache, "compiled", "paper")
    _assert_same_training(eager, compiled, atol=1e-6)  # measured: 2.2e-8


@pytest.mark.integration
def test_a_step_that_cannot_be_compiled_runs_unfused_and_says_so(
    cache: Path, tmp_path: Path
) -> None:
    """No working compiler (a slim container without gcc, where Triton builds its launcher): the
    run goes on with the unfused step, its numbers those of the graph step, and result.json says
    why. In a process of its own, with its own empty compile cache."""
    script = (
        "import sys, json; from agegender.config import load_config; "
        "from agegender.train import train_fold; "
        f"c = load_config(None, {[*TINY, 'train.iterations=6', 'train.tencrop=false']!r} + "
        "[f'train.step={sys.argv[1]}']); "
        "print(json.dumps(train_fold(sys.argv[2], 0, c, sys.argv[3]).summary))"
    )
    env = {**os.environ, "CXX": "/bin/false", "CC": "/bin/false"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    out = {}
    for step in ("compiled", "graph"):
        res = subprocess.run(
            [sys.executable, "-c", script, step, str(cache), str(tmp_path / step)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[step] = json.loads(res.stdout.strip().splitlines()[-1])
    assert "torch.compile failed, the step runs unfused: " in out["compiled"]["step"]
    assert "compiler" in out["compiled"]["step"].lower()
    assert out["compiled"]["test"] == out["graph"]["test"]
    assert "failed" not in out["graph"]["step"]
