"""Training steps drawn ahead: everything random or data-dependent that a chunk of SGD steps
needs, made on the CPU and copied to the device in one go.

On a GPU, each copy of a CPU tensor to the device (`.to(device)`) and each question about a
device tensor's values (`mask.any()`, boolean indexing) makes the host wait until the GPU has
caught up. At batch 50 a step is a few milliseconds of GPU work, so eight such waits a step kept
the GPU idle while Python queued the next kernels, and several folds sharing one GPU could not
fill each other's gaps. Here a step only slices tensors that are already on the device.

The draws are the per-step loop's, call for call: crop windows from the run's data generator
and dropout masks from its dropout generator, step after step, in the same order, so a run trains
exactly the same numbers as before (`tests/test_steps.py`). `drawn` makes a chunk's draws;
`planned` cuts them into the eager loop's steps, `agegender.graph_step` lays them out in the
fixed buffers its CUDA graph reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from agegender.data import PartData
from agegender.models import HeadTargets, SeededDropout, labelled_rows
from agegender.transforms import Window, draw_window

CHUNK = 64  # steps drawn and copied at once: ~3 MB at batch 50, one copy instead of 64 x 8


@dataclass(frozen=True)
class Step:
    """One step's batch, on the device (the store's positions stay on the CPU when the images
    are not preloaded: they are read from the memmap)."""

    positions: Tensor
    window: Window
    targets: dict[str, Tensor]  # head -> the batch's labels, -1 = none (for accuracies)
    labelled: dict[str, HeadTargets]  # head -> what the loss needs (`models.labelled_losses`)
    masks: list[Tensor]  # one keep-mask (bool) per dropout layer, in forward order

    @property
    def size(self) -> int:
        return len(self.targets["age"])


def to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":  # pinned, so the copy is queued and the host goes on
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Drawn:
    """Up to CHUNK steps' draws, on the CPU, step after step in each tensor: `sizes[s]` rows for
    step s (the rows' positions in the part's store, crop windows, labels, -1 = none) and their
    dropout masks (each step's rows for each layer in turn)."""

    sizes: list[int]
    rows: dict[str, Tensor]  # positions, top, left, flip, age, gender: (sum(sizes),)
    masks: Tensor | None  # (sum(sizes) x layers, features) bool; None without dropout


def drawn(
    part: PartData,
    order: Tensor,
    steps: int,
    batch_size: int,
    image_side: tuple[int, int],
    crop: int,
    gen_data: torch.Generator,
    dropouts: list[SeededDropout],
) -> Iterator[Drawn]:
    """The epoch's first `steps` batches of `order`, CHUNK steps at a time: the draws of the
    step-by-step loop, call for call, from the run's generators."""
    for first in range(0, steps, CHUNK):
        sels = [
            order[s * batch_size : (s + 1) * batch_size]
            for s in range(first, min(first + CHUNK, steps))
        ]
        windows = [draw_window(len(sel), image_side, crop, gen_data) for sel in sels]
        masks = [[d.draw(len(sel)).bool() for d in dropouts] for sel in sels]
        chosen = torch.cat(sels)
        yield Drawn(
            sizes=[len(sel) for sel in sels],
            rows={
                "positions": part.index[chosen],
                "top": torch.cat([t for t, _, _ in windows]),
                "left": torch.cat([le for _, le, _ in windows]),
                "flip": torch.cat([f for _, _, f in windows]),
                "age": part.age[chosen],
                "gender": part.gender[chosen],
            },
            masks=torch.cat([torch.cat(m) for m in masks]) if dropouts else None,
        )


def planned(
    chunks: Iterable[Drawn],
    heads: list[str],
    n_dropouts: int,
    device: torch.device,
    positions_on_device: bool,
) -> Iterator[Step]:
    """`drawn`'s chunks as the eager loop's steps, one copy to the device a chunk."""
    for chunk in chunks:
        flat = dict(chunk.rows)
        found: dict[str, list[HeadTargets]] = {h: [] for h in heads}
        for head in heads:
            labels = torch.split(flat[head], chunk.sizes)
            kept_at, kept = [], []
            for y in labels:
                at, labels_kept, count = labelled_rows(y)
                found[head].append((at, labels_kept, count))
                if at is not None:
                    kept_at.append(at)
                kept.append(labels_kept)
            flat[f"{head}_at"] = torch.cat(kept_at) if kept_at else torch.zeros(0, dtype=torch.long)
            flat[f"{head}_kept"] = torch.cat(kept)
        if chunk.masks is not None:
            flat["masks"] = chunk.masks
        on = {
            k: v if k == "positions" and not positions_on_device else to_device(v, device)
            for k, v in flat.items()
        }
        yield from _slices(on, chunk.sizes, found, heads, n_dropouts)


def _slices(
    on: dict[str, Tensor],
    sizes: list[int],
    found: dict[str, list[HeadTargets]],
    heads: list[str],
    n_dropouts: int,
) -> Iterator[Step]:
    """Cut the chunk's device tensors back into steps, by offsets known on the CPU."""
    start = 0
    at_start = dict.fromkeys(heads, 0)
    kept_start = dict.fromkeys(heads, 0)
    for s, n in enumerate(sizes):
        cut = slice(start, start + n)
        labelled: dict[str, HeadTargets] = {}
        for head in heads:
            at, _, count = found[head][s]
            y = on[f"{head}_kept"][kept_start[head] : kept_start[head] + count]
            kept_start[head] += count
            if at is not None:
                at = on[f"{head}_at"][at_start[head] : at_start[head] + len(at)]
                at_start[head] += len(at)
            labelled[head] = (at, y, count)
        masks = []
        if n_dropouts:
            rows = on["masks"][start * n_dropouts : (start + n) * n_dropouts]
            masks = list(torch.split(rows, n))
        yield Step(
            positions=on["positions"][cut],
            window=(on["top"][cut], on["left"][cut], on["flip"][cut]),
            targets={"age": on["age"][cut], "gender": on["gender"][cut]},
            labelled=labelled,
            masks=masks,
        )
        start += n
