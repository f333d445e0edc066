"""Fold-batching: K folds trained as one grouped network, each still training exactly its own.

A batch of 50 is too small to fill a large GPU, and K folds in threads still launch K times the
kernels. Here K runs' parameters are stacked (K, ...) and one `torch.func.vmap` of the net does
the K forward and backward passes: convolutions become one grouped convolution, the fully
connected layers one batched matmul. Each fold keeps its own parameters, optimiser state (the
update rule is element-wise, so one optimiser over stacked tensors updates each slice as its
own would), data order, crops and dropout masks (`agegender.steps`, from its own generators), and
its own epochs: a fold whose epoch ends draws its next shuffle while the others go on; a short
last batch is padded with rows that carry no label, so they add nothing to any loss or gradient.

For LRN nets (the paper's) with one schedule for all K (`train.iterations`): batch norm mixes the
rows of a batch, and epoch-based schedules differ per fold. What it trains equals training each
fold alone up to floating-point summation order (`tests/test_steps.py`). Measured against folds
in threads by `benchmarks/gpu_suite.py --fold-batch`; the suite does not use it yet.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from agegender.models import SeededDropout, autocast, labelled_losses
from agegender.steps import Step
from agegender.train import Run, RunError, epoch_steps, lr_factor, make_optimizer, step_input


class _GivenMask(nn.Module):
    """Dropout whose keep-mask is a buffer, so that `functional_call` hands each fold its own."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.mask
        assert isinstance(mask, Tensor)
        return x * mask.to(x.dtype) / (1 - self.p)


class FoldBatch:
    """K prepared runs (`train.start_run`) trained together; `unstack` gives each its weights."""

    def __init__(self, runs: list[Run]) -> None:
        first = runs[0]
        config = first.config
        problems = [
            why
            for why, bad in (
                ("model.norm=lrn (batch norm mixes a batch's rows)", config.model.norm != "lrn"),
                ("train.epochs=null (one schedule for all)", config.train.epochs is not None),
                ("one config for all folds", any(r.config != config for r in runs)),
                ("one device", any(r.device != first.device for r in runs)),
                ("fresh runs", any(r.iteration for r in runs)),
            )
            if bad
        ]
        if problems:
            raise RunError(f"fold-batching needs {', '.join(problems)}")
        self.runs = runs
        self.config, self.device = config, first.device
        self.net = copy.deepcopy(first.model)
        masks = []
        for name, module in list(self.net.named_modules()):
            if isinstance(module, SeededDropout) and module.p > 0:
                parent, _, child = name.rpartition(".")
                setattr(self.net.get_submodule(parent), child, _GivenMask(module.p))
                masks.append(f"{name}.mask")
        self.mask_names = masks
        own = [dict(r.model.named_parameters()) for r in runs]
        self.params = {
            n: torch.stack([o[n].detach() for o in own]).requires_grad_(p.requires_grad)
            for n, p in self.net.named_parameters()
        }
        self.optimizer = make_optimizer(self.net, config, self.params)
        self.total = config.train.iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config, self.total)
        )
        self._epochs: list[Iterator[Step]] = [iter(()) for _ in runs]
        self.iteration = 0

        def one(params: dict[str, Tensor], masks: list[Tensor], x: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = functional_call(
                self.net, {**params, **dict(zip(self.mask_names, masks, strict=True))}, (x,)
            )
            return out

        self._forward = vmap(one)

    def _next(self, k: int) -> Step:
        """Fold k's next batch; a new shuffle (its own epoch) when the last one is used up."""
        run = self.runs[k]
        step = next(self._epochs[k], None)
        if step is None:
            steps = math.ceil(len(run.data.train) / self.config.data.batch_size)
            self._epochs[k] = epoch_steps(run, steps)
            step = next(self._epochs[k])
        return step

    def train_steps(self, n: int) -> Tensor:
        """n steps of every fold; the summed training loss of the last (left on the device)."""
        self.net.train()
        bs, t = self.config.data.batch_size, self.config.train
        weights = {"age": t.age_weight, "gender": t.gender_weight}
        loss = torch.zeros((), device=self.device)
        for _ in range(n):
            steps = [self._next(k) for k in range(len(self.runs))]
            xs: list[Tensor] = []
            masks: list[list[Tensor]] = [[] for _ in self.mask_names]
            for run, step in zip(self.runs, steps, strict=True):
                xs.append(_pad(step_input(run, step, channels_last=False), bs))
                for i, m in enumerate(step.masks):
                    masks[i].append(_pad(m, bs))
            with autocast(self.device, t.bf16):
                out = self._forward(self.params, [torch.stack(m) for m in masks], torch.stack(xs))
            loss = torch.zeros((), device=self.device)
            for k, step in enumerate(steps):
                mine = {h: v[k, : step.size] for h, v in out.items()}
                for h, v in labelled_losses(mine, step.labelled).items():
                    loss = loss + weights[h] * v
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            self.scheduler.step()
            self.iteration += 1
        return loss.detach()

    def unstack(self) -> None:
        """Each run's model gets its fold's slice of the stacked weights (to validate, test or
        save it the usual way); its iteration count follows."""
        with torch.no_grad():
            for k, run in enumerate(self.runs):
                for name, p in run.model.named_parameters():
                    p.copy_(self.params[name][k])
                run.iteration = self.iteration


def _pad(t: Tensor, rows: int) -> Tensor:
    """A short last batch filled up with zero rows (no label points at them)."""
    if len(t) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - len(t), *t.shape[1:]))])
