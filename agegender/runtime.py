"""What a training run sets in its process while it trains: deterministic algorithms, the float
precision of CUDA's convolutions and matmuls (`train.deterministic`, `train.precision`), and a
CUDA stream of its own.

The suite trains several folds at once as threads of one process, and torch's flags are
process-wide: so the first run in sets them and the last one out restores them (a fold that
finished first must not switch TF32 back on under the others), and a run that asks for other
values while runs holding theirs still train is refused with one line. A stream is the run's
alone while it trains: torch hands out streams from a small pool, round robin, and a stream
shared with a fold that is capturing its CUDA graph would put this run's work into that graph.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from agegender.config import Precision


class SettingError(ValueError):
    """A run asked for a process-wide setting other than the one the runs training beside it
    hold."""


class Held:
    """A process-wide setting that runs hold while they train (see the module's docstring)."""

    def __init__(self, name: str, get: Callable[[], Any], put: Callable[[Any], None]) -> None:
        self.name, self._get, self._put = name, get, put
        self._lock = threading.Lock()
        self._count = 0
        self._value: Any = None
        self._saved: Any = None

    @contextmanager
    def hold(self, value: Any, asked: str) -> Iterator[None]:
        with self._lock:
            if self._count and value != self._value:
                raise SettingError(
                    f"{asked}, but {self._count} run(s) training in this process hold "
                    f"{self.name}={self._value}, which is process-wide: train runs that differ "
                    "in it one after another or in separate processes"
                )
            if not self._count:
                self._saved = self._get()
                self._put(value)
                self._value = value
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if not self._count:
                    self._put(self._saved)


def _get_determinism() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark


def _put_determinism(value: tuple[bool, bool]) -> None:
    if value[0]:  # cuBLAS needs a fixed workspace to be deterministic; set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(value[0])
    torch.backends.cudnn.benchmark = value[1]


def _get_tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _put_tf32(value: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = value


_DETERMINISM = Held(
    "deterministic algorithms, cuDNN autotuning", _get_determinism, _put_determinism
)
_TF32 = Held("TF32 matmuls, TF32 convolutions", _get_tf32, _put_tf32)


@contextmanager
def determinism(on: bool) -> Iterator[None]:
    """`train.deterministic`: PyTorch's deterministic algorithms (and a fixed cuBLAS workspace)
    while the run trains; otherwise cuDNN times its algorithms once per shape and keeps the
    fastest."""
    with _DETERMINISM.hold((on, not on), f"train.deterministic={str(on).lower()}"):
        yield


@contextmanager
def float_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """`train.precision` on CUDA: `tf32` lets convolutions and matmuls round their float32
    inputs to TF32 (10-bit mantissa, tensor cores); `fp32` and `bf16` (whose float32 parts stay
    float32; autocast does the rest) do not. Nothing changes on a CPU."""
    if device.type != "cuda":
        yield
        return
    tf32 = precision == "tf32"
    with _TF32.hold((tf32, tf32), f"train.precision={precision}"):
        yield


_streams_lock = threading.Lock()
_streams_in_use: set[tuple[int, int]] = set()  # (device, stream handle)


@contextmanager
def reserved_stream(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """A CUDA stream that no other live run of this process has (None on a CPU)."""
    if device.type != "cuda":
        yield None
        return
    with _streams_lock:
        for priority in (0, -1):  # torch's pools: 32 streams of each priority per device
            for _ in range(32):
                stream = torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]
                key = (stream.device_index, stream.cuda_stream)
                if key not in _streams_in_use:
                    _streams_in_use.add(key)
                    break
            else:
                continue
            break
        else:
            raise SettingError(f"more than 64 runs at once on {device}: no CUDA stream is free")
    try:
        yield stream
    finally:
        with _streams_lock:
            _streams_in_use.discard(key)


@contextmanager
def own_stream(device: torch.device) -> Iterator[None]:
    """On a GPU, the run queues its work on a CUDA stream of its own: folds that share a GPU (the
    suite's slots are threads of one process) then run their kernels side by side, where on the
    shared default stream each would wait for the others'."""
    with reserved_stream(device) as stream:
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()
