"""Several folds training at once on one device, the suite's way: aggregate images/s for K = 1,
2, 4, 8 folds at batch 50, the fraction of the device's FLOP bound, and the paper suite's time.

    python benchmarks/gpu_suite.py                           # 227 of 256, K = 1 2 4 8, --json F
    python benchmarks/gpu_suite.py --crop 48 --image-size 56 --per-fold 60 --iterations 6 \\
        --folds-at-once 1 2                                  # the CPU smoke run (tests)
    python benchmarks/gpu_suite.py --cache runs/cache        # images already cached (256 px)

Each of the K folds is a real run of its own fold (`train_epoch`: its own shuffles, crops and
dropout masks from its own generators, its own model and optimiser) in a thread of its own, each
with its own CUDA stream (`train.own_stream`) and all reading one copy of the images on the device
(`data.shared_images`): K folds at once is what `suite.slots=K` does on one GPU. Aggregate =
K x iterations x batch / the wall time of all K, after a warm-up (cuDNN's autotuning).
`--fold-batch` also times K folds trained as one grouped network (`agegender.foldbatch`: one
vmap over their stacked weights, one thread), which the suite does not use yet.

The bound: the net's training FLOPs per image (torch's FlopCounterMode over a forward and a
backward pass) at the device's dense matmul rate, measured here (bf16 on a GPU, fp32 on a CPU),
or `--peak-tflops`. The projection: the paper suite's training images (4 variants x 5 folds plus
pretraining, `train.iterations` x `data.batch_size` each, the paper preset's) at the best
aggregate rate; validation and testing are not in it (the device script's 10k-iteration run
shows their share). `--check-sync` trains one fold's steps with CUDA's sync debug mode set to
error: a step that makes the host wait for the GPU fails it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from agegender.cache import build_cache, open_cache
from agegender.config import VARIANTS, CacheConfig, Config, load_config
from agegender.foldbatch import FoldBatch
from agegender.models import build_model
from agegender.synth.adience import write_synthetic
from agegender.train import Run, own_stream, prepare_run, train_epoch


def flops_per_image(config: Config) -> float:
    """Training FLOPs of one image: forward and backward, as torch counts them."""
    model = build_model(config.train.task, config.data.crop, config.model, seed=0)
    x = torch.randn(2, 3, config.data.crop, config.data.crop)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        sum(v.sum() for v in out.values()).backward()
    return float(counter.get_total_flops()) / 2


def peak_flops(device: torch.device) -> tuple[float, str]:
    """Dense matmul FLOP/s: bf16 8192^2 on a GPU, fp32 512^2 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), f"{dtype} {n}x{n} matmul".replace(
        "torch.", ""
    )


def seeded_config(config: Config, k: int) -> Config:
    """The k-th run's config: folds 0-4, then again with another seed."""
    return config.model_copy(update={"train": config.train.model_copy(update={"seed": k // 5})})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(run: Run, iterations: int) -> None:
    with own_stream(run.device):
        target = run.iteration + iterations
        run.total = target
        while run.iteration < target:
            train_epoch(run)


def at_once(runs: list[Run], iterations: int) -> float:
    """Seconds for every run to train `iterations` steps, each in a thread of its own."""
    _sync(runs[0].device)
    workers = [threading.Thread(target=steps, args=(r, iterations)) for r in runs]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    _sync(runs[0].device)
    return time.perf_counter() - start


def check_sync(run: Run) -> str:
    """Train one epoch with CUDA's sync debug mode on from its second step to its last: 'none'
    when no step waited for the device, else the error it raised."""
    if run.device.type != "cuda":
        return "not checked (no CUDA device)"

    def watch(done: int, total: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if done < total else "default")

    run.total = run.iteration + 10**6
    try:
        with own_stream(run.device):
            train_epoch(run, watch)
    except RuntimeError as exc:
        return f"a step waited for the device: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=200, help="timed steps per fold")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per fold first")
    ap.add_argument("--per-fold", type=int, default=600, help="synthetic images per fold")
    ap.add_argument("--cache", type=Path, default=None, help="an image cache instead (Adience)")
    ap.add_argument("--folds-at-once", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="instead of measuring")
    ap.add_argument("--check-sync", action="store_true")
    ap.add_argument(
        "--fold-batch", action="store_true", help="also K folds as one grouped net (foldbatch)"
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    # the mean image from 500 training images, not all: the same work per step, less set-up
    overrides = [f"data.crop={a.crop}", f"data.batch_size={a.batch_size}", "data.norm_images=500"]
    overrides += [f"train.bf16={a.bf16}", f"train.device={a.device}"]
    config = load_config(None, overrides, "paper")
    flops = flops_per_image(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if a.cache is None:
            start = time.perf_counter()
            write_synthetic(root / "adience", size=a.image_size, per_fold=a.per_fold, seed=0)
            config_cache = CacheConfig(image_size=a.image_size)
            build_cache(root / "adience", root / "cache", config=config_cache)
            print(f"synthetic data and cache: {time.perf_counter() - start:.0f} s", flush=True)
        cache = open_cache(a.cache or root / "cache")
        most = max(a.folds_at_once)
        runs = []
        for k in range(most):
            runs.append(prepare_run(cache, k % 5, seeded_config(config, k)))
        device = runs[0].device
        if a.peak_tflops is not None:
            peak, peak_by = a.peak_tflops * 1e12, "given"
        else:
            peak, peak_by = peak_flops(device)
        at_once(runs, a.warmup)
        sync = check_sync(runs[0]) if a.check_sync else "not checked"
        rows: list[dict[str, Any]] = []
        for k in a.folds_at_once:
            seconds = at_once(runs[:k], a.iterations)
            rate = k * a.iterations * a.batch_size / seconds
            rows.append({"mode": "threads", "folds": k, "img_per_s": rate, "seconds": seconds})
        for k in a.folds_at_once if a.fold_batch else ():
            fb = FoldBatch([prepare_run(cache, i % 5, seeded_config(config, i)) for i in range(k)])
            fb.train_steps(a.warmup)
            _sync(device)
            start = time.perf_counter()
            fb.train_steps(a.iterations)
            _sync(device)
            seconds = time.perf_counter() - start
            rate = k * a.iterations * a.batch_size / seconds
            rows.append({"mode": "batched", "folds": k, "img_per_s": rate, "seconds": seconds})
            del fb

    paper = load_config(None, [], "paper")
    suite_images = (len(VARIANTS) * 5 + 1) * paper.train.iterations * paper.data.batch_size
    base = rows[0]["img_per_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, crop {a.crop} of {a.image_size}, batch {a.batch_size}, bf16 "
        f"{a.bf16 and device.type == 'cuda'}, {a.iterations} steps per fold, threads with own "
        f"streams, one shared image copy (preloaded {runs[0].data.store.preloaded})"
    )
    print(
        f"training FLOPs per image {flops / 1e9:.2f} G; peak {peak / 1e12:.1f} TFLOP/s ({peak_by})"
    )
    print(f"bound {peak / flops:,.0f} img/s; paper suite {suite_images / 1e6:.1f} M images")
    if device.type != "cuda":
        print("(a CPU smoke run: the bound is one small matmul's rate, the times mean nothing)")
    print(f"syncs inside a step: {sync}")
    print(
        " how      | folds at once |  img/s total | per fold | vs 1 fold | of bound | suite (min)"
    )
    for r in rows:
        r["per_fold"] = r["img_per_s"] / r["folds"]
        r["speedup"] = r["img_per_s"] / base
        r["bound_fraction"] = r["img_per_s"] * flops / peak
        r["suite_minutes"] = suite_images / r["img_per_s"] / 60
        print(
            f" {r['mode']:<8} | {r['folds']:>13} | {r['img_per_s']:>12,.0f} | "
            f"{r['per_fold']:>8,.0f} | {r['speedup']:>8.2f}x | {r['bound_fraction']:>7.1%} | "
            f"{r['suite_minutes']:>10.1f}"
        )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "crop": a.crop,
                    "image_size": a.image_size,
                    "batch_size": a.batch_size,
                    "bf16": a.bf16,
                    "iterations_per_fold": a.iterations,
                    "flops_per_image": flops,
                    "peak_flops": peak,
                    "peak_by": peak_by,
                    "suite_images": suite_images,
                    "sync_check": sync,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
