"""Cache build throughput vs a naive PIL loop on the same 816x816 JPEGs, in one process.

    python benchmarks/prepare.py [--images 500] [--workers 0]

Baseline: for each file, PIL open + convert("RGB") + resize to 256x256 (PIL's default filter),
one after another, which is what a plain Dataset.__getitem__ does on every epoch. Ours:
`build_cache` (reduced-scale JPEG decode, torch uint8 antialiased resize, threads, memmap write).
Target: ratio >= 3.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from agegender.cache import build_cache
from agegender.config import CacheConfig
from agegender.synth.adience import write_synthetic


def naive(paths: list[Path], size: int) -> float:
    start = time.perf_counter()
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size)))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=816, help="side of the source JPEGs")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="reuse/keep the synthetic set here")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or Path(tmp) / "adience"
        synth = write_synthetic(data, size=a.size, per_fold=max(8, a.images // 5), seed=0)
        paths = sorted((data / "aligned").rglob("*.jpg"))
        naive(paths[:5], a.image_size)  # warm the page cache and imports for both contenders
        build_cache(data, Path(tmp) / "warm", config=CacheConfig(image_size=a.image_size))

        t_naive = naive(paths, a.image_size)
        config = CacheConfig(image_size=a.image_size, workers=a.workers)
        start = time.perf_counter()
        res = build_cache(data, Path(tmp) / "cache", config=config)
        t_ours = time.perf_counter() - start
        assert res.decoded == len(paths) == synth.images, (res.decoded, len(paths))

    n = len(paths)
    print(f"{n} JPEGs {a.size}x{a.size} -> {a.image_size}x{a.image_size}, {os.cpu_count()} cores")
    print(f"naive PIL loop : {n / t_naive:8.1f} img/s  ({t_naive:.2f} s)")
    print(
        f"build_cache    : {n / t_ours:8.1f} img/s  ({t_ours:.2f} s, index and manifest included)"
    )
    print(f"ratio          : {t_naive / t_ours:8.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
