"""Two CPU folds at once with half of torch's threads each (what `suite.slots=2` does on a CPU)
vs one after another with all of them (`suite.slots=1`), in one process.

    python benchmarks/slots.py [--crop 64 --image-size 72] [--iterations 12] [--modern]

Each arm trains two real folds (`train_epoch`: cache, crops, forward, backward, step) for
`--iterations` steps each; the arms alternate `--repeat` times, so a load that changes on a
shared machine hits both. The ratio > 1 is how much faster slots make the suite's folds.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, load_config
from agegender.synth.adience import write_synthetic
from agegender.train import Run, prepare_run, train_epoch


def steps(run: Run, iterations: int) -> None:
    target = run.iteration + iterations
    run.total = target
    while run.iteration < target:
        train_epoch(run)


def sequential(runs: list[Run], iterations: int, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for run in runs:
        steps(run, iterations)
    return time.perf_counter() - start


def concurrent(runs: list[Run], iterations: int, threads: int) -> float:
    torch.set_num_threads(max(1, threads // len(runs)))  # what set_slots does on a CPU
    workers = [threading.Thread(target=steps, args=(r, iterations)) for r in runs]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=72)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--per-fold", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root / "adience", size=a.image_size, per_fold=a.per_fold, seed=0)
        build_cache(root / "adience", root / "cache", config=CacheConfig(image_size=a.image_size))
        config = load_config(
            None, [f"data.crop={a.crop}", f"data.batch_size={a.batch_size}"], "modern"
        )
        cache = open_cache(root / "cache")
        runs = [prepare_run(cache, k, config) for k in (0, 1)]
        sequential(runs, 1, threads)  # warm-up
        seq, con = [], []
        for _ in range(a.repeat):
            seq.append(sequential(runs, a.iterations, threads))
            con.append(concurrent(runs, a.iterations, threads))
    torch.set_num_threads(threads)
    images = 2 * a.iterations * a.batch_size
    s, c = images / min(seq), images / min(con)
    print(f"cpu, {threads} torch threads, crop {a.crop} of {a.image_size}, batch {a.batch_size}")
    print(f"one fold after another, {threads} threads: {s:8.1f} img/s (best of {a.repeat})")
    print(f"two folds at once, {max(1, threads // 2)} thread(s) each: {c:8.1f} img/s")
    print(f"ratio                            : {c / s:8.2f}  (> 1: slots are faster)")


if __name__ == "__main__":
    main()
