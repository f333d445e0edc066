"""Does the cache's resize matter? Ours (JPEG draft + antialiased bilinear) against Caffe's.

    python benchmarks/resize.py --work /tmp/resize                         # synthetic, 816 px
    python benchmarks/resize.py --work /tmp/resize --iterations 5000 --device cuda
    python benchmarks/resize.py --work /tmp/resize --data-root /data/adience   # a real download

Caffe's `convert_imageset` (the authors' pipeline) decoded each JPEG in full (cv::imread) and
resized it with cv::resize (INTER_LINEAR: bilinear, no antialiasing) to 256 x 256; our cache
(`cache.resize=antialias`) lets the JPEG decoder downscale first and resizes with antialiasing.
`cache.resize=caffe` does what convert_imageset did. Both caches are built from the same
images (without `--data-root`: `agegender synth`, 816 px JPEGs like Adience's aligned faces,
`--per-fold` rows a fold), then compared pixel by pixel (mean absolute difference per pixel
value, and of the mean image over all cached images, in 0-255 units), then fold 0 is trained on
each with the `paper` preset, the same seed and `--iterations` steps (lr x0.1 every
`--decay-every`), and the test accuracies and their differences are printed. `--json FILE`
writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, load_config
from agegender.synth.adience import write_synthetic
from agegender.train import train_fold

RESIZES = ("antialias", "caffe")
METRICS = ("age_acc", "age_1off", "gender_acc")


def pixels(work: Path) -> dict[str, float]:
    """How far the two caches' pixels are apart (0-255 units), image by image and on average."""
    a, b = (open_cache(work / f"cache-{r}") for r in RESIZES)
    assert a.table.rows == b.table.rows, "the two caches hold different rows"
    total, worst, mean_a, mean_b = 0.0, 0.0, 0.0, 0.0
    n = len(a.images)
    for i in range(n):
        x, y = a.images[i].astype(np.float64), b.images[i].astype(np.float64)
        d = np.abs(x - y)
        total, worst = total + d.mean(), max(worst, float(d.max()))
        mean_a, mean_b = mean_a + x / n, mean_b + y / n
    gap = np.abs(mean_a - mean_b)
    return {
        "images": n,
        "mean_abs_diff": total / n,
        "max_abs_diff": worst,
        "mean_image_mean_abs_diff": float(gap.mean()),
        "mean_image_max_abs_diff": float(gap.max()),
    }


def train(a: argparse.Namespace, work: Path, resize: str) -> dict[str, Any]:
    config = load_config(
        None,
        [
            f"data.crop={a.crop}",
            f"train.iterations={a.iterations}",
            f"train.device={a.device}",
            f"optim.decay_every={min(1.0, a.decay_every / a.iterations)}",
            f"train.seed={a.seed}",
        ],
        preset="paper",
    )
    start = time.perf_counter()
    s = train_fold(work / f"cache-{resize}", 0, config, work / f"run-{resize}").summary
    test = {k: float(v) for k, v in s["test"].items() if isinstance(v, float)}
    seconds = time.perf_counter() - start
    print(
        f"{resize:9}: fold 0 test after {s['iterations']:,} iterations ({seconds:.0f} s): "
        + ", ".join(f"{k} {test[k]:.3f}" for k in METRICS if k in test),
        flush=True,
    )
    return {"iterations": s["iterations"], "seconds": seconds, "test": test, "sizes": s["sizes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for data, caches and runs")
    ap.add_argument("--data-root", type=Path, default=None, help="a real (or synthetic) download")
    ap.add_argument("--per-fold", type=int, default=200, help="synthetic rows a fold")
    ap.add_argument("--source-size", type=int, default=816, help="synthetic JPEG side")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--iterations", type=int, default=0, help="0 = compare pixels only")
    ap.add_argument("--decay-every", type=int, default=10_000, help="iterations per lr step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    work: Path = a.work
    source = a.data_root
    if source is None:
        source = work / "adience"
        write_synthetic(source, size=a.source_size, per_fold=a.per_fold, seed=0)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    for resize in RESIZES:
        start = time.perf_counter()
        config = CacheConfig(image_size=a.image_size, resize=resize)
        built = build_cache(source, work / f"cache-{resize}", config=config)
        seconds = time.perf_counter() - start
        print(f"cache {resize}: {built.images:,} images at {a.image_size} px in {seconds:.0f} s")
        results[f"cache_{resize}_seconds"] = seconds
    results["pixels"] = px = pixels(work)
    print(
        f"pixels ({px['images']:,} images, 0-255): mean |difference| {px['mean_abs_diff']:.2f} "
        f"(max {px['max_abs_diff']:.0f}); mean images: mean |difference| "
        f"{px['mean_image_mean_abs_diff']:.3f} (max {px['mean_image_max_abs_diff']:.2f})",
        flush=True,
    )
    if a.iterations:
        runs = {r: train(a, work, r) for r in RESIZES}
        results["runs"] = runs
        diff = {
            k: runs["caffe"]["test"][k] - runs["antialias"]["test"][k]
            for k in runs["caffe"]["test"]
        }
        results["caffe_minus_antialias"] = diff
        print("caffe - antialias: " + ", ".join(f"{k} {diff[k]:+.3f}" for k in METRICS))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
