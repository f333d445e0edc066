"""Several folds training at once on one device, the suite's way: aggregate images/s for K = 1,
2, 4, 8 folds at batch 50, for each step mode (eager / graph / compiled) and precision, with the
fraction of the device's FLOP bound and the paper suite's training time at that rate.

    python benchmarks/gpu_suite.py                   # 227 of 256: eager, compiled x fp32, bf16
    python benchmarks/gpu_suite.py --steps graph compiled --precisions bf16 --folds-at-once 4 8
    python benchmarks/gpu_suite.py --crop 48 --image-size 56 --per-fold 40 --iterations 3 \\
        --warmup 5 --folds-at-once 1 2 --steps eager graph --precisions fp32   # the CPU smoke run
    python benchmarks/gpu_suite.py --cache runs/cache        # images already cached (256 px)

Each of the K folds is a real run of its own fold (`train_epoch`: its own shuffles, crops and
dropout masks from its own generators, its own model and optimiser) in a thread of its own, each
on a CUDA stream of its own (`runtime.reserved_stream`), all reading one copy of the images on
the device (`data.shared_images`): K folds at once is what `suite.slots=K` does on one GPU.
Aggregate = K x iterations x batch / the wall time of all K, after a warm-up (cuDNN's
autotuning, compiling, capturing each fold's graph), whose time is reported too (`setup_s`: once
per process and shape for compiling, once per fold for capturing).

Every (step, precision) arm runs in a process of its own, so a crash or a hung device in one
cannot take another down; it prints and appends each K's row (`--rows FILE`, JSON lines) as soon
as it is measured. An arm that dies is started again for the K values it had not reached.

The bound: the net's training FLOPs per image (torch's FlopCounterMode, forward and backward) at
the device's dense matmul rate, measured here (bf16 on a GPU, fp32 on a CPU) or `--peak-tflops`.
The paper suite's training images: 4 variants x 5 folds plus pretraining, `train.iterations` x
`data.batch_size` each (the paper preset's); validation and testing are not in these rates
(`benchmarks/projection.py` adds them from a fold trained end to end). `--check-sync` trains one
fold's epoch with CUDA's sync debug mode set to error after its warm-up: a step that makes the
host wait for the GPU fails it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from agegender.cache import build_cache, open_cache
from agegender.config import VARIANTS, CacheConfig, Config, load_config
from agegender.models import build_model
from agegender.runtime import determinism, float_precision, reserved_stream
from agegender.synth.adience import write_synthetic
from agegender.train import Run, prepare_run, train_epoch


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
    """The k-th run's config: folds 0-4, then again with another seed (one config per fold)."""
    return config.model_copy(update={"train": config.train.model_copy(update={"seed": k // 5})})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Streams = dict[int, "torch.cuda.Stream | None"]  # id(run) -> its stream, for the arm's life


def on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def steps(run: Run, iterations: int, stream: torch.cuda.Stream | None) -> None:
    """`iterations` steps of the run on its stream (always the same one: its graph's)."""
    with on_stream(stream):
        target = run.iteration + iterations
        run.total = target
        while run.iteration < target:
            train_epoch(run)


def at_once(runs: list[Run], iterations: int, streams: Streams) -> float:
    """Seconds for every run to train `iterations` steps, each in a thread of its own."""
    _sync(runs[0].device)
    failed: list[BaseException] = []

    def one(run: Run) -> None:
        try:
            steps(run, iterations, streams[id(run)])
        except BaseException as exc:
            failed.append(exc)

    workers = [threading.Thread(target=one, args=(r,)) for r in runs]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    _sync(runs[0].device)
    if failed:
        raise failed[0]
    return time.perf_counter() - start


def check_sync(run: Run, stream: torch.cuda.Stream | None) -> str:
    """One epoch with CUDA's sync debug mode on from its second step to its last: 'none' when
    no step waited for the device, else the error it raised."""
    if run.device.type != "cuda":
        return "not checked (no CUDA device)"

    def watch(done: int, total: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if done < total else "default")

    run.total = run.iteration + 10**6
    try:
        with on_stream(stream):
            train_epoch(run, watch)
    except RuntimeError as exc:
        return f"a step waited for the device: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


def arm(a: argparse.Namespace) -> None:
    """One (step, precision) arm in this process: K folds at once for each K, a row each."""
    config = load_config(None, _overrides(a, a.arm[0], a.arm[1]), "paper")
    cache = open_cache(a.cache)
    start = time.perf_counter()
    runs = [
        prepare_run(cache, k % 5, seeded_config(config, k)) for k in range(max(a.folds_at_once))
    ]
    device = runs[0].device
    with (
        determinism(False),
        float_precision(config.train.precision, device),
        contextlib.ExitStack() as held,
    ):
        streams = {id(r): held.enter_context(reserved_stream(device)) for r in runs}
        at_once(runs, a.warmup, streams)  # compiles once, captures each fold's graph
        setup = time.perf_counter() - start
        sync = check_sync(runs[0], streams[id(runs[0])]) if a.check_sync else "not checked"
        for k in a.folds_at_once:
            if os.environ.get("GPU_SUITE_CRASH") == f"{a.arm[0]}:{k}":  # tests: an arm that dies
                os._exit(3)
            seconds = at_once(runs[:k], a.iterations, streams)
            row = {
                "step": a.arm[0],
                "precision": a.arm[1],
                "folds": k,
                "img_per_s": k * a.iterations * a.batch_size / seconds,
                "seconds": seconds,
                "setup_s": setup,
                "sync_check": sync,
                "ran_as": {r.mode for r in runs[:k]}.pop(),
                "notes": sorted({r.engine.note for r in runs[:k] if r.engine and r.engine.note}),
            }
            print(
                f"ROW {row['step']:<8} {row['precision']:<4} K={k}: {row['img_per_s']:,.0f} "
                f"img/s ({seconds:.1f} s; set-up {setup:.0f} s; syncs: {sync})",
                flush=True,
            )
            with a.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _overrides(a: argparse.Namespace, step: str, precision: str) -> list[str]:
    # the mean image from 500 training images, not all: the same work per step, less set-up
    return [
        f"data.crop={a.crop}",
        f"data.batch_size={a.batch_size}",
        "data.norm_images=500",
        f"train.precision={precision}",
        f"train.step={step}",
        f"train.device={a.device}",
    ]


def run_arm(a: argparse.Namespace, step: str, precision: str, cache: Path, rows: Path) -> None:
    """The arm in child processes, again for the K values left when one dies or hangs."""
    left = list(a.folds_at_once)
    while left:
        cmd = [sys.executable, __file__, "--arm", step, precision, "--cache", str(cache)]
        cmd += ["--rows", str(rows), "--folds-at-once", *map(str, left)]
        for flag in ("crop", "batch_size", "iterations", "warmup", "device"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        cmd += ["--check-sync"] if a.check_sync else []
        try:  # its rows print as they come; its errors are kept for the failure's row
            proc = subprocess.run(cmd, timeout=a.arm_timeout, stderr=subprocess.PIPE, text=True)
            rc, tail = proc.returncode, proc.stderr[-600:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = -1, f"timed out after {a.arm_timeout} s: {str(exc.stderr or '')[-300:]}"
        done = {r["folds"] for r in _rows(rows) if (r["step"], r["precision"]) == (step, precision)}
        if rc == 0 and all(k in done for k in left):
            return
        failed = next(k for k in left if k not in done)
        print(f"ROW {step:<8} {precision:<4} K={failed}: FAILED (exit {rc}): {tail}", flush=True)
        with rows.open("a") as f:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "precision": precision,
                        "folds": failed,
                        "error": tail,
                        "exit": rc,
                    }
                )
                + "\n"
            )
        left = [k for k in left if k > failed and k not in done]


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    ap.add_argument(
        "--steps", nargs="+", default=["eager", "compiled"], choices=["eager", "graph", "compiled"]
    )
    ap.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"]
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="instead of measuring")
    ap.add_argument("--check-sync", action="store_true")
    ap.add_argument("--arm-timeout", type=float, default=600, help="seconds for an arm's process")
    ap.add_argument("--rows", type=Path, default=None, help="append each row here (JSON lines)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--arm", nargs=2, default=None, metavar=("STEP", "PRECISION"), help=argparse.SUPPRESS
    )  # a child process: one arm
    a = ap.parse_args()
    if a.arm is not None:
        return arm(a)

    config = load_config(None, _overrides(a, "eager", "fp32"), "paper")
    flops = flops_per_image(config)
    device = torch.device("cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu")
    if a.peak_tflops is not None:
        peak, peak_by = a.peak_tflops * 1e12, "given"
    else:
        peak, peak_by = peak_flops(device)
    paper = load_config(None, [], "paper")
    suite_images = (len(VARIANTS) * 5 + 1) * paper.train.iterations * paper.data.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, crop {a.crop} of {a.image_size}, batch "
        f"{a.batch_size}, {a.iterations} steps per fold; threads with own streams, one image copy"
    )
    print(
        f"training FLOPs per image {flops / 1e9:.2f} G; peak {peak / 1e12:.1f} TFLOP/s ({peak_by})"
    )
    print(
        f"bound {peak / flops:,.0f} img/s; paper suite {suite_images / 1e6:.1f} M images",
        flush=True,
    )
    if device.type != "cuda":
        print("(a CPU smoke run: the bound is one small matmul's rate, the times mean nothing)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = a.rows or root / "rows.jsonl"
        if a.cache is None:
            start = time.perf_counter()
            write_synthetic(root / "adience", size=a.image_size, per_fold=a.per_fold, seed=0)
            config_cache = CacheConfig(image_size=a.image_size)
            build_cache(root / "adience", root / "cache", config=config_cache)
            print(f"synthetic data and cache: {time.perf_counter() - start:.0f} s", flush=True)
        for step in a.steps:  # in the order asked: what matters most first
            for precision in a.precisions:
                run_arm(a, step, precision, a.cache or root / "cache", rows)
        measured = [r for r in _rows(rows) if "img_per_s" in r]

    print(" step     | prec | folds at once |  img/s total | per fold | of bound | suite (min)")
    for r in measured:
        r["per_fold"] = r["img_per_s"] / r["folds"]
        r["bound_fraction"] = r["img_per_s"] * flops / peak
        r["suite_minutes"] = suite_images / r["img_per_s"] / 60
        print(
            f" {r['step']:<8} | {r['precision']:<4} | {r['folds']:>13} | {r['img_per_s']:>12,.0f} |"
            f" {r['per_fold']:>8,.0f} | {r['bound_fraction']:>7.1%} | {r['suite_minutes']:>10.1f}"
        )
    if measured:
        best = max(measured, key=lambda r: r["img_per_s"])
        print(
            f"best: {best['step']} {best['precision']} K={best['folds']}, "
            f"{best['img_per_s']:,.0f} img/s, the paper suite's training in "
            f"{best['suite_minutes']:.1f} min"
        )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "crop": a.crop,
                    "image_size": a.image_size,
                    "batch_size": a.batch_size,
                    "iterations_per_fold": a.iterations,
                    "flops_per_image": flops,
                    "peak_flops": peak,
                    "peak_by": peak_by,
                    "suite_images": suite_images,
                    "rows": measured,
                    "cpus": os.cpu_count(),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
