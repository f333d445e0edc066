"""Evaluation of a model on one part of a fold: centre crop, optionally 10-crop over-sampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from agegender.data import ImageStore, PartData
from agegender.metrics import head_metrics
from agegender.models import autocast, masked_losses, to_input
from agegender.transforms import Normalize, center_crop, ten_crops

Probs = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Predictions:
    center: Probs  # head -> (N, classes) softmax of the centre crop
    tencrop: Probs | None  # head -> mean softmax over the 10 crops
    losses: dict[str, float]  # head -> mean cross-entropy (centre crop) over labelled rows


@torch.no_grad()
def predict(
    model: nn.Module,
    store: ImageStore,
    part: PartData,
    crop: int,
    normalize: Normalize,
    batch_size: int,
    tencrop: bool = False,
    bf16: bool = False,
    channels_last: bool = False,
) -> Predictions:
    was_training = model.training
    model.eval()
    device = store.device
    center: dict[str, list[Tensor]] = {}
    multi: dict[str, list[Tensor]] = {}
    loss_sum: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(part), batch_size):
        images = store.batch(part.index[i : i + batch_size])
        targets = {
            "age": part.age[i : i + batch_size].to(device),
            "gender": part.gender[i : i + batch_size].to(device),
        }
        full = normalize(images)
        with autocast(device, bf16):
            out = model(to_input(center_crop(full, crop), channels_last))
        for head, logits in out.items():
            center.setdefault(head, []).append(logits.float().softmax(1).cpu())
            y = targets[head]
            if (y >= 0).any():
                ce = masked_losses({head: logits}, {head: y}, reduction="sum")[head]
                loss_sum[head] = loss_sum.get(head, 0.0) + float(ce)
                counts[head] = counts.get(head, 0) + int((y >= 0).sum())
        if tencrop:
            total: dict[str, Tensor] = {}
            for view in ten_crops(full, crop):
                with autocast(device, bf16):
                    o = model(to_input(view, channels_last))
                for head, logits in o.items():
                    total[head] = total.get(head, 0) + logits.float().softmax(1)
            for head, t in total.items():
                multi.setdefault(head, []).append((t / 10).cpu())
    model.train(was_training)
    return Predictions(
        center=_concat(center),
        tencrop=_concat(multi) if tencrop else None,
        losses={h: loss_sum[h] / counts[h] for h in loss_sum},
    )


def _concat(chunks: dict[str, list[Tensor]]) -> Probs:
    return {head: torch.cat(parts).numpy() for head, parts in chunks.items()}


def part_metrics(
    probs: Probs,
    part: PartData,
    suffix: str = "",
    users: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-head metrics (see `head_metrics`), keys suffixed e.g. `_10crop`; with `users` (one
    per row of the part), user-clustered bootstrap intervals seeded by `seed`."""
    out: dict[str, Any] = {}
    targets = {"age": part.age.numpy(), "gender": part.gender.numpy()}
    for head, p in probs.items():
        for key, value in head_metrics(p, targets[head], head, users, seed).items():
            out[key + suffix] = value
    return out
