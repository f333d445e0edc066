"""Steps drawn ahead train exactly what steps drawn one at a time trained, and folds trained at
once (threads sharing one copy of the images, as `suite.slots=K` runs them on one GPU) train
exactly what each fold trains alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import agegender.steps
from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, load_config
from agegender.data import PartData
from agegender.models import SeededDropout, labelled_losses, masked_losses
from agegender.steps import drawn, planned
from agegender.synth.adience import SynthResult
from agegender.train import prepare_run, train_fold
from agegender.transforms import random_window


def _part(n: int) -> PartData:
    g = torch.Generator().manual_seed(0)
    age = torch.randint(-1, 8, (n,), generator=g)  # some rows without an age label
    gender = torch.randint(0, 2, (n,), generator=g)
    return PartData(index=torch.randperm(n, generator=g) + 100, age=age, gender=gender, rows=None)  # type: ignore[arg-type]


def test_planned_steps_draw_what_steps_drawn_one_at_a_time_drew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows, dropout masks and labelled rows of 7 steps drawn in chunks of 3 (and a short
    last batch) equal the per-step loop's draws from the same generators, in the same order."""
    monkeypatch.setattr(agegender.steps, "CHUNK", 3)
    part, bs, side, crop = _part(47), 7, (20, 24), 16
    order = torch.randperm(len(part), generator=torch.Generator().manual_seed(1))
    part.gender[order[:bs]] = -1  # a batch with no gender label at all
    drops = [SeededDropout(0.5, 5), SeededDropout(0.5, 5)]
    shared = torch.Generator().manual_seed(2)  # one generator for both layers, as in a run
    for d in drops:
        d.generator = shared
    gen = torch.Generator().manual_seed(3)
    chunks = drawn(part, order, 7, bs, side, crop, gen, drops)
    got = list(planned(chunks, ["age", "gender"], len(drops), torch.device("cpu"), True))

    ref_gen, ref_drop = torch.Generator().manual_seed(3), torch.Generator().manual_seed(2)
    images = torch.zeros(1, *side, 3)
    assert len(got) == 7
    assert got[-1].size == 47 - 6 * 7
    for s, step in enumerate(got):
        sel = order[s * bs : (s + 1) * bs]
        assert torch.equal(step.positions, part.index[sel])
        for mine, theirs in zip(
            step.window,
            random_window(images.expand(len(sel), -1, -1, -1), crop, ref_gen),
            strict=True,
        ):
            assert torch.equal(mine, theirs)
        for mask in step.masks:  # the two layers share a generator here: drawn in order
            ref = torch.empty(len(sel), 5).bernoulli_(0.5, generator=ref_drop)
            assert torch.equal(mask, ref.bool())
        for head in ("age", "gender"):
            y = getattr(part, head)[sel]
            at, kept, count = step.labelled[head]
            assert torch.equal(step.targets[head], y)
            assert count == int((y >= 0).sum())
            assert torch.equal(kept, y[y >= 0])
            if count == len(y):
                assert at is None
            else:
                assert at is not None
                assert torch.equal(at, torch.nonzero(y >= 0).flatten())
    assert got[0].labelled["gender"][2] == 0  # the batch without gender labels


def test_losses_on_rows_found_ahead_equal_masked_losses() -> None:
    """The same loss and gradients, bit for bit, with labels missing, complete or absent."""
    g = torch.Generator().manual_seed(0)
    for y in (
        torch.tensor([0, -1, 7, 3, -1, 2]),
        torch.tensor([1, 0, 2, 3, 4, 5]),
        torch.full((6,), -1),
    ):
        base = torch.randn(6, 8, generator=g)
        a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
        have = y >= 0
        at = None if bool(have.all()) else torch.nonzero(have).flatten()
        mine = labelled_losses({"age": a}, {"age": (at, y[have], int(have.sum()))})["age"]
        theirs = masked_losses({"age": b}, {"age": y})["age"]
        mine.backward()
        theirs.backward()
        assert torch.equal(mine, theirs)
        assert torch.equal(a.grad, b.grad)  # type: ignore[arg-type]


def _numbers(out: Path) -> dict[str, Any]:
    result = json.loads((out / "result.json").read_text())
    history = json.loads((out / "history.json").read_text())
    return {
        "test": result["test"],
        "val": result["val"],
        "history": [{k: v for k, v in h.items() if k != "images_per_s"} for h in history],
    }


@pytest.mark.integration
def test_folds_trained_at_once_equal_folds_trained_alone(
    small_synth: SynthResult, tmp_path: Path
) -> None:
    """Three folds in three threads at once (one torch thread each, as on a CPU slot) give every
    number that each gives alone, and they read one shared copy of the images."""
    build_cache(small_synth.out, tmp_path / "cache", config=CacheConfig(image_size=56))
    cache = open_cache(tmp_path / "cache")
    config = load_config(None, ["data.crop=48", "train.iterations=30", "train.tencrop=true"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = {}
        for fold in (0, 1, 2):
            train_fold(cache, fold, config, tmp_path / f"alone{fold}")
            alone[fold] = _numbers(tmp_path / f"alone{fold}")
        workers = [
            threading.Thread(target=train_fold, args=(cache, f, config, tmp_path / f"together{f}"))
            for f in (0, 1, 2)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
    for fold in (0, 1, 2):
        assert _numbers(tmp_path / f"together{fold}") == alone[fold], f"fold {fold}"
    assert len(alone[0]["history"]) > 2  # several epochs, so the generators carried over
    runs = [prepare_run(cache, f, config) for f in (0, 1)]
    assert runs[0].data.store.data is runs[1].data.store.data  # one copy of the images
