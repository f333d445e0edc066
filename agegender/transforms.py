"""Batched crops, flips and normalisation on the device, from uint8 NHWC images.

Images travel as uint8 (4x less than float) and are cropped with one gather per batch: no
per-sample Python in the hot loop. Training: random crop + horizontal flip (the paper); test:
centre crop or the 10-crop over-sampling (4 corners + centre, and their mirrors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalize:
    """Per-channel mean and std on the 0-255 scale, measured on the training split only."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, crops: Tensor) -> Tensor:
        """uint8 (B, h, w, 3) -> float (B, 3, h, w), channels-last in memory (free: a view)."""
        x = crops.permute(0, 3, 1, 2).float()
        mean, std = _stats(self, x.device)
        return (x - mean) / std

    @classmethod
    def measure(cls, images: np.ndarray, index: np.ndarray) -> Normalize:
        """Statistics of `images[index]` (uint8 NHWC, a memmap is fine), read in small chunks."""
        total = np.zeros(3)
        squares = np.zeros(3)
        count = 0
        for i in range(0, len(index), 32):
            chunk = np.asarray(images[index[i : i + 32]], dtype=np.float32).reshape(-1, 3)
            total += chunk.sum(0, dtype=np.float64)
            squares += np.square(chunk).sum(0, dtype=np.float64)
            count += len(chunk)
        if count == 0:
            raise ValueError("no training images to measure the normalisation on")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 1.0))
        m, s = [float(v) for v in mean], [float(v) for v in std]
        return cls((m[0], m[1], m[2]), (s[0], s[1], s[2]))


@functools.cache
def _stats(norm: Normalize, device: torch.device) -> tuple[Tensor, Tensor]:
    """The statistics as (1, 3, 1, 1) tensors on a device, made once, not once per batch."""
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(norm.std, device=device).view(1, 3, 1, 1)


def crop_batch(images: Tensor, top: Tensor, left: Tensor, size: int, flip: Tensor) -> Tensor:
    """Per-sample crops (and mirrors) of (B, H, W, 3) images in one gather."""
    ar = torch.arange(size, device=images.device)
    rows = top.to(images.device)[:, None] + ar  # (B, size)
    cols = left.to(images.device)[:, None] + ar
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    b = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[b, rows[:, :, None], cols[:, None, :]]


def random_crop_flip(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Training augmentation; offsets and flips come from the fold's own generator."""
    n, h, w, _ = images.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return crop_batch(images, top, left, size, flip)


def center_crop(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top : top + size, left : left + size]


def ten_crops(images: Tensor, size: int) -> list[Tensor]:
    """The Caffe over-sampling: 4 corners and the centre, each also mirrored."""
    h, w = images.shape[1:3]
    offsets = [
        (0, 0),
        (0, w - size),
        (h - size, 0),
        (h - size, w - size),
        ((h - size) // 2, (w - size) // 2),
    ]
    crops = [images[:, t : t + size, s : s + size] for t, s in offsets]
    return crops + [c.flip(2) for c in crops]
