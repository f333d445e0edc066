"""Training throughput through the real cache + loader vs a model-only bound, in one process.

    python benchmarks/train_throughput.py [--crop 227 --image-size 256] [--iterations 10]
    python benchmarks/train_throughput.py --step compiled --precision bf16 --iterations 200

Pipeline: `train_epoch` on a prepared fold (uint8 images from the image store, batched random
crop + flip + normalisation on the device, forward, masked losses, backward, optimiser step,
learning rate and statistics), in the run's step mode (`train.step`: on CUDA `auto` is the
compiled step replayed as one CUDA graph). Bound: the same step alone on one ready float batch
already on the device (same model, batch size and optimiser; one step's batch and dropout masks,
again and again; `fit_batch` when eager, `GraphStep.model_only` otherwise, captured likewise).
The ratio pipeline / bound says how much the work around the model costs; target >= 0.95 at
batch 50.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, load_config
from agegender.graph_step import GraphStep
from agegender.runtime import determinism, float_precision, own_stream
from agegender.synth.adience import write_synthetic
from agegender.train import Run, epoch_steps, fit_batch, prepare_run, step_input, train_epoch


def _sync(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def pipeline(run: Run, iterations: int) -> float:
    """Images/s of `iterations` steps of the real training loop."""
    _sync(run)
    start = time.perf_counter()
    target = run.iteration + iterations
    run.total = target
    while run.iteration < target:
        train_epoch(run)
    _sync(run)
    return iterations * run.config.data.batch_size / (time.perf_counter() - start)


def bound(run: Run, iterations: int) -> float:
    """Images/s of the model step alone on one batch that is already on the device."""
    (step,) = epoch_steps(run, 1)
    x = step_input(run, step)
    run.model.train()
    if run.mode == "eager":

        def one() -> None:
            fit_batch(run, x, step)

    else:
        if run.engine is None:
            run.engine = GraphStep(run, compiled=run.mode == "compiled")
        one = run.engine.model_only(x)
    one()
    _sync(run)
    start = time.perf_counter()
    for _ in range(iterations):
        one()
    _sync(run)
    return iterations * step.size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--per-fold", type=int, default=80)
    ap.add_argument("--cache", type=Path, default=None, help="an image cache instead (Adience)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--step", default="auto", choices=["auto", "eager", "graph", "compiled"])
    ap.add_argument("--warmup", type=int, default=6, help="pipeline steps first (compiling)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if a.cache is None:
            write_synthetic(root / "adience", size=a.image_size, per_fold=a.per_fold, seed=0)
            config_cache = CacheConfig(image_size=a.image_size)
            build_cache(root / "adience", root / "cache", config=config_cache)
        config = load_config(
            None,
            [
                f"data.crop={a.crop}",
                f"data.batch_size={a.batch_size}",
                f"train.precision={a.precision}",
                f"train.step={a.step}",
                f"train.device={a.device}",
            ],
        )
        run = prepare_run(open_cache(a.cache or root / "cache"), 0, config)
        with (
            determinism(False),
            float_precision(a.precision, run.device),
            own_stream(run.device),
        ):
            pipeline(run, a.warmup)  # warm-up: allocator, kernels, compiling, the graph
            b1 = bound(run, a.iterations)  # (its first call captures its own graph)
            p = pipeline(run, a.iterations)
            b2 = bound(run, a.iterations)

    name = torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu"
    b = (b1 + b2) / 2
    print(
        f"device {name}, crop {a.crop} of {a.image_size}, batch {a.batch_size}, precision "
        f"{a.precision}, step {run.mode}, images preloaded {run.data.store.preloaded}"
    )
    print(f"model-only bound : {b:9.1f} img/s  (runs {b1:.1f} and {b2:.1f})")
    print(f"cache + loader   : {p:9.1f} img/s")
    print(f"ratio            : {p / b:9.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
