"""Device slots: the devices that training runs in this process may occupy, one run each.

A flow calls `set_slots` before it submits folds; a task takes a slot for as long as it trains.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from agegender.config import Config
from agegender.train import select_device

_slots: queue.Queue[str] | None = None  # None until a flow has said how many
CPU_THREADS = torch.get_num_threads()  # torch's own choice (cores, or OMP_NUM_THREADS)
# Folds at once on one GPU when suite.slots=0: the best K measured on one H200 (the suite's
# threads, issue 22: 12.0k img/s with 8 against 11.0k with 4; the graphed step's replica in
# ../shared/gpu-probe: 31.4k with 8 against 31.0k with 4). Each fold holds its own model,
# optimiser and graph (under 1 GB at 227 px), all share one copy of the images.
PER_GPU = 8


class SlotsError(RuntimeError):
    """A run asked for a slot before any flow set them up: a bug, never a wait."""


def set_slots(n: int) -> int:
    """n slots (0 = PER_GPU per GPU, else 1); each is a device string a fold trains on.

    On a CPU the slots share the process's torch threads: each fold gets cores // n of them, so
    n folds never oversubscribe the cores (`suite.slots=2` on 2 cores: two folds with one thread
    each, faster than one fold on two threads, by far on a loaded machine, where the two threads
    wait on each other: `benchmarks/slots.py`), and one slot keeps every core. The thread count
    changes float sums, so runs compared number for number use the same slots."""
    global _slots
    gpus = torch.cuda.device_count()
    n = n or (gpus * PER_GPU if gpus else 1)
    slots: queue.Queue[str] = queue.Queue()
    for i in range(n):
        slots.put(f"cuda:{i % gpus}" if gpus else "cpu")
    _slots = slots
    if not gpus:  # one thread pool per process: the slots' threads share it
        torch.set_num_threads(max(1, CPU_THREADS // n))
    return n


@contextmanager
def slot() -> Iterator[str]:
    """A free device (waiting for one while every slot trains)."""
    slots = _slots
    if slots is None:
        raise SlotsError(
            "no device slots: the flow must call tasks.slots.set_slots(n) before it runs "
            "training tasks (otherwise they would wait forever)"
        )
    device = slots.get()
    try:
        yield device
    finally:
        slots.put(device)


def fold_device(requested: str, free: str) -> tuple[str, str | None]:
    """The device a run trains on, given its `train.device` and the slot it got, and why
    `auto` fell back to the CPU (None when it did not). A CUDA device asked for and missing is
    an error (`select_device`); only `auto` falls back to the CPU."""
    select_device(requested)
    if requested == "auto":
        return free, ("cpu: auto found no CUDA device" if free == "cpu" else None)
    if requested == "cuda" and free.startswith("cuda"):
        return free, None  # the slot's GPU
    return requested, None


def on_device(config: Config, device: str) -> Config:
    return config.model_copy(update={"train": config.train.model_copy(update={"device": device})})
