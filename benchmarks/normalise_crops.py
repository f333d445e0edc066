"""The training path's crop + normalisation: `Normalize.crops` against normalising the whole
images, then cropping (the baseline), in one process, for each kind of normalisation.

    python benchmarks/normalise_crops.py [--image-size 256 --crop 227] [--batches 40]

Random uint8 images on the device, batches of 50, the same random windows for both paths; both
must give identical numbers (checked).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from agegender.train import select_device
from agegender.transforms import Normalize, crop_batch, random_window

BATCH = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[Tensor, torch.Generator], Tensor], images: Tensor, batches: int) -> float:
    picks = torch.randint(0, len(images), (batches + 3, BATCH), generator=torch.Generator())
    gen = torch.Generator().manual_seed(0)
    for i in range(3):  # warm-up
        fn(images[picks[i].to(images.device)], gen)
    _sync(images.device)
    start = time.perf_counter()
    for i in range(3, batches + 3):
        fn(images[picks[i].to(images.device)], gen)
    _sync(images.device)
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = select_device(a.device)
    size, crop = a.image_size, a.crop
    images = torch.randint(0, 256, (a.images, size, size, 3), dtype=torch.uint8, device=device)
    rng = np.random.default_rng(0)
    kinds = {
        "mean_image": Normalize(rng.uniform(80, 160, (size, size, 3))),
        "channel_mean": Normalize([120.0, 110.0, 100.0]),
        "channel_mean_std": Normalize([120.0, 110.0, 100.0], [60.0, 58.0, 57.0]),
    }
    print(f"device {device}, {size} px images, {crop} px crops, batch {BATCH}")
    for kind, norm in kinds.items():

        def baseline(b: Tensor, g: torch.Generator, norm: Normalize = norm) -> Tensor:
            top, left, flip = random_window(b, crop, g)
            return crop_batch(norm(b), top, left, crop, flip)

        def ours(b: Tensor, g: torch.Generator, norm: Normalize = norm) -> Tensor:
            return norm.crops(b, crop, random_window(b, crop, g))

        b1 = rate(baseline, images, a.batches)
        o = rate(ours, images, a.batches)
        b2 = rate(baseline, images, a.batches)
        same = torch.equal(
            baseline(images[:BATCH], torch.Generator().manual_seed(1)),
            ours(images[:BATCH], torch.Generator().manual_seed(1)),
        )
        base = (b1 + b2) / 2
        print(
            f"{kind:17} normalise-then-crop {base:9,.0f} img/s (runs {b1:,.0f}, {b2:,.0f}) | "
            f"crops() {o:9,.0f} img/s | ratio {o / base:5.2f} | identical {same}"
        )


if __name__ == "__main__":
    main()
