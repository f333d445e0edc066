"""Chunked work over all cores, with progress, for the image-heavy steps (decode, synthesis)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]
"""Called with (done, total) as items finish."""


def _one_thread_per_process() -> None:
    # The processes already use every core; native libraries must not oversubscribe them.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def map_chunks(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    workers: int = 0,
    progress: Progress | None = None,
    threads: bool = False,
) -> list[R]:
    """`fn` over chunks of `items` on `workers` (0 = all cores); one result per item, in order.

    Processes are spawned (fork after torch or threads can deadlock); `threads=True` is for work
    that releases the GIL. Small process jobs run here: interpreter start-up would dominate.
    """
    total = len(items)
    workers = workers or os.cpu_count() or 1
    size = max(4, min(64, total // (workers * 4) or 1))
    chunks = [list(items[i : i + size]) for i in range(0, total, size)]
    out: list[R] = []
    if progress:
        progress(0, total)
    if workers == 1 or (not threads and total < 2 * size):
        for chunk in chunks:
            out.extend(fn(chunk))
            if progress:
                progress(len(out), total)
        return out
    pool: Executor
    if threads:
        pool = ThreadPoolExecutor(workers)
    else:
        ctx = get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread_per_process)
    with pool:
        for result in pool.map(fn, chunks):
            out.extend(result)
            if progress:
                progress(len(out), total)
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Limit torch's intra-op threads for a block (our own threads already use the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
