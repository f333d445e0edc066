"""Batched crops, flips and normalisation on the device, from uint8 NHWC images.

Images travel as uint8 (4x less than float) and are cropped with one gather per batch, then
normalised on the device: no per-sample Python in the hot loop. Training: random crop +
horizontal flip (the paper); test: centre crop or the 10-crop over-sampling (4 corners + centre,
and their mirrors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from agegender.config import Normalization

Window = tuple[Tensor, Tensor, Tensor]  # per image: crop top, crop left, mirror


class Normalize:
    """What is subtracted from (and divided into) the 0-255 pixels, measured on training images.

    `mean` is either Caffe's per-pixel mean image (H, W, 3), subtracted from the whole image
    before it is cropped (as Caffe's data layer does), or one value per channel (3,). `std` is
    per channel, or None: Caffe divides by nothing, and its initialisation (N(0, 0.01)) expects
    inputs of that size; divided by a std they are ~60x smaller.
    """

    def __init__(self, mean: npt.ArrayLike, std: npt.ArrayLike | None = None) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        if self.mean.shape != (3,) and (self.mean.ndim != 3 or self.mean.shape[2] != 3):
            raise ValueError(f"mean must be (3,) or (H, W, 3), got {self.mean.shape}")
        self._on: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    @property
    def kind(self) -> Normalization:
        if self.mean.ndim == 3:
            return "mean_image"
        return "channel_mean" if self.std is None else "channel_mean_std"

    def on(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """mean and std on the images' device (made once per device, not once per batch)."""
        if images.device not in self._on:
            std = None if self.std is None else torch.from_numpy(self.std).to(images.device)
            self._on[images.device] = (torch.from_numpy(self.mean).to(images.device), std)
        mean, std = self._on[images.device]
        if mean.ndim == 3 and mean.shape != images.shape[1:]:
            raise ValueError(
                f"the mean image is {tuple(mean.shape)}, the images {tuple(images.shape[1:])}"
            )
        return mean, std

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> float (B, H, W, 3), whole images (crop afterwards)."""
        mean, std = self.on(images)
        x = images.float() - mean
        return x if std is None else x / std

    def crops(self, images: Tensor, size: int, window: Window) -> Tensor:
        """Normalised crops (`window`: see `random_window`) of uint8 (B, H, W, 3) images, the
        training hot path; the numbers of normalising the whole images, then cropping. With
        per-channel statistics the uint8 pixels are gathered and only the crops converted, as
        before the mean image existed; a mean image is subtracted from the whole images before
        the one gather (gathering the mean's crops as well measured 25-30 % slower).
        `benchmarks/normalise_crops.py` compares both against normalise-then-crop."""
        top, left, flip = window
        mean, std = self.on(images)
        if mean.ndim == 3:
            return crop_batch(self(images), top, left, size, flip)
        x = crop_batch(images, top, left, size, flip).float() - mean
        return x if std is None else x / std

    @classmethod
    def measure(
        cls, images: np.ndarray, index: np.ndarray, kind: Normalization = "mean_image"
    ) -> Normalize:
        """Statistics of `images[index]` (uint8 NHWC, a memmap is fine), read in small chunks."""
        total = np.zeros(images.shape[1:], dtype=np.float64)
        squares = np.zeros(3)
        count = 0
        for i in range(0, len(index), 32):
            chunk = np.asarray(images[index[i : i + 32]], dtype=np.float32)
            total += chunk.sum(0, dtype=np.float64)
            if kind == "channel_mean_std":
                squares += np.square(chunk.reshape(-1, 3)).sum(0, dtype=np.float64)
            count += len(chunk)
        if count == 0:
            raise ValueError("no training images to measure the normalisation on")
        image = total / count
        if kind == "mean_image":
            return cls(image)
        mean = image.reshape(-1, 3).mean(0)
        if kind == "channel_mean":
            return cls(mean)
        pixels = count * int(np.prod(total.shape[:-1]))
        return cls(mean, np.sqrt(np.maximum(squares / pixels - mean**2, 1.0)))

    def state(self) -> dict[str, Any]:
        """Everything needed to apply it again (stored in checkpoints): tensors, which
        `weights_only` loading accepts (numpy arrays it does not, by default)."""
        return {
            "mean": torch.from_numpy(self.mean),
            "std": None if self.std is None else torch.from_numpy(self.std),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalize:
        return cls(state["mean"], state.get("std"))

    def describe(self) -> dict[str, Any]:
        """A small summary for result files, logs and model metadata (not the mean image)."""
        channel = self.mean.reshape(-1, 3).mean(0, dtype=np.float64)
        return {
            "kind": self.kind,
            "mean": [float(v) for v in channel],
            "std": None if self.std is None else [float(v) for v in self.std],
            "shape": list(self.mean.shape),
        }


def crop_batch(images: Tensor, top: Tensor, left: Tensor, size: int, flip: Tensor) -> Tensor:
    """Per-sample crops (and mirrors) of (B, H, W, 3) images in one gather."""
    ar = torch.arange(size, device=images.device)
    rows = top.to(images.device)[:, None] + ar  # (B, size)
    cols = left.to(images.device)[:, None] + ar
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    b = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[b, rows[:, :, None], cols[:, None, :]]


def random_window(images: Tensor, size: int, generator: torch.Generator) -> Window:
    """Training augmentation: per-image crop offsets and flips (top, left, flip) from the fold's
    own generator."""
    n, h, w, _ = images.shape
    return draw_window(n, (h, w), size, generator)


def draw_window(n: int, side: tuple[int, int], size: int, generator: torch.Generator) -> Window:
    """`random_window` from the images' count and side alone (`agegender.steps` draws ahead)."""
    h, w = side
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return top, left, flip


def random_crop_flip(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    top, left, flip = random_window(images, size, generator)
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
