"""Prediction on new photos with a trained checkpoint, with exactly the training preprocessing.

A photo is decoded and resized as the cache does (`agegender.cache.decode_image`: JPEG draft,
centre square, antialiased resize to the checkpoint's image size), then centre-cropped (or
10-crop over-sampled) and normalised with the statistics stored in the checkpoint. Files that
cannot be used (missing, not an image, corrupt, too many pixels) get a row saying why; the batch
goes on. Face detection comes later (the inference issue): for now the whole photo is one face,
as the Adience aligned images are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from agegender.cache import decode_image
from agegender.config import Config
from agegender.evaluate import to_input
from agegender.models import LeviHassner, build_model
from agegender.train import RunError, select_device
from agegender.transforms import Normalize, center_crop, ten_crops

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 50_000_000  # a 50 MP photo is plausible; beyond that, a decompression bomb


@dataclass(frozen=True)
class Predictor:
    """A trained net with everything needed to use it: sizes, normalisation, label names."""

    model: LeviHassner
    crop: int
    image_size: int
    normalize: Normalize
    labels: dict[str, list[str]]
    device: torch.device

    @classmethod
    def load(cls, checkpoint: Path | str, device: str = "auto") -> Predictor:
        try:
            best = torch.load(checkpoint, map_location="cpu", weights_only=False)
            config = Config.model_validate(best["config"])
            labels = {h: list(v) for h, v in best["labels"].items()}
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise RunError(f"{checkpoint}: not a readable agegender best.pt ({exc})") from None
        crop = int(best["crop"])
        model = build_model(
            best["task"], crop, config.model, classes={h: len(v) for h, v in labels.items()}
        )
        model.load_state_dict(best["model"])
        dev = select_device(device)
        model.to(dev).eval()
        norm = best["normalize"]
        return cls(
            model=model,
            crop=crop,
            # checkpoints from before the size was stored: the paper's 227 of 256
            image_size=int(best.get("image_size", round(crop * 256 / 227))),
            normalize=Normalize(tuple(norm["mean"]), tuple(norm["std"])),
            labels=labels,
            device=dev,
        )

    @torch.no_grad()
    def probabilities(
        self, images: npt.NDArray[np.uint8], oversample: bool = False
    ) -> dict[str, npt.NDArray[np.float32]]:
        """uint8 (N, size, size, 3) -> head -> (N, classes) softmax (10-crop mean if asked)."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        views = ten_crops(batch, self.crop) if oversample else [center_crop(batch, self.crop)]
        total: dict[str, torch.Tensor] = {}
        for view in views:
            out = self.model(to_input(view, self.normalize, channels_last=False))
            for head, logits in out.items():
                total[head] = total.get(head, 0) + logits.float().softmax(1)
        return {h: (t / len(views)).cpu().numpy() for h, t in total.items()}

    def row(self, path: str, probs: dict[str, npt.NDArray[np.float32]], i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"path": path, "face": "whole image", "error": None}
        for head, p in probs.items():
            k = int(p[i].argmax())
            out[head] = self.labels[head][k]
            out[f"{head}_prob"] = round(float(p[i][k]), 4)
            names = self.labels[head]
            out[f"{head}_probs"] = {n: round(float(v), 4) for n, v in zip(names, p[i], strict=True)}
        return out


def collect_paths(inputs: Sequence[Path | str]) -> list[str]:
    """Images named by files, folders (recursively, image suffixes only) and `.txt` lists."""
    out: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            out += map(str, found)
        elif item.suffix.lower() == ".txt" and item.is_file():
            lines = item.read_text(encoding="utf-8", errors="replace").splitlines()
            out += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        else:
            out.append(str(item))  # missing files get their error row
    return out


def load_photo(path: str, size: int, max_pixels: int = MAX_PIXELS) -> npt.NDArray[np.uint8]:
    """The training decode of one photo; a clear ValueError for anything unusable."""
    if not os.path.isfile(path):
        raise ValueError("file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too many pixels ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not an image PIL can read ({type(exc).__name__}: {exc})") from None
    if w * h > max_pixels:
        raise ValueError(f"{w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    try:
        return decode_image(path, size)
    except Exception as exc:  # truncated or corrupt data shows only when decoding
        raise ValueError(f"cannot decode ({type(exc).__name__}: {exc})") from None


def predict_paths(
    predictor: Predictor,
    paths: Sequence[str],
    oversample: bool = False,
    batch_size: int = 64,
    max_pixels: int = MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """A row per path, in order: the prediction, or `error` saying why there is none."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        rows: list[dict[str, Any] | None] = []
        images, where = [], []
        for path in chunk:
            try:
                images.append(load_photo(path, predictor.image_size, max_pixels))
                where.append(len(rows))
                rows.append(None)
            except ValueError as exc:
                rows.append({"path": path, "face": None, "error": str(exc)})
        if images:
            probs = predictor.probabilities(np.stack(images), oversample)
            for i, pos in enumerate(where):
                rows[pos] = predictor.row(chunk[pos], probs, i)
        for row in rows:
            assert row is not None
            yield row
        if progress:
            progress(min(start + batch_size, len(paths)), len(paths))
