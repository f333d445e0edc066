"""The training step as one CUDA graph: gather, crop and normalise the batch from the images on
the device, forward, loss, backward, optimiser step, learning rate and epoch statistics, replayed
with one launch.

Why: at the paper's batch of 50 a step of the Levi-Hassner net is 2.7-3.5 ms of GPU work in a
few hundred kernels. Launched one by one from Python they leave a large GPU waiting: on an H200
a replica of this step (`../shared/gpu-probe`, bf16, channels-last) ran 7.8k img/s eagerly, 19.2k
as one CUDA graph, 31.1k compiled and graphed. So everything a step reads sits in tensors that
never move: a chunk of steps' draws (`agegender.steps.drawn`, the eager loop's own draws, call for
call) is copied in once per CHUNK steps, with each step's learning rate, and an index on the
device that the step itself advances picks the step's row. Between two chunk copies the host
does one launch a step and waits for nothing; the statistics are read once an epoch.

`compiled` puts the input side, the forward pass and the loss through `torch.compile`: Inductor
fuses the gather, crop, mean subtraction and layout into one kernel, and the LRN's shifted adds
and power, ReLU, pooling epilogues and dropout multiplies into a few (its backward too). The
model is an argument of the compiled function, so the folds of one process share one compilation
per shape (task and crop), not one per fold.

On a CPU there is no graph: `graph` runs the same step op by op and `compiled` runs it compiled,
which is how the tests check that this step trains what the eager loop trains. A batch of
another size (an epoch's short last batch) runs the same step eagerly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agegender.models import to_input
from agegender.steps import CHUNK, Drawn, to_device

if TYPE_CHECKING:
    from agegender.train import Run

WARMUP = 3  # eager steps before the capture: cuDNN's autotuning, optimiser state, compiling
_one_at_a_time = threading.Lock()  # compiling and capturing (folds in threads start together)
_compiled: Callable[..., tuple[Tensor, Tensor]] | None = None


def compile_errors() -> tuple[type[Exception], ...]:
    """What torch.compile raises when it cannot compile (not what a step raises when it runs:
    an out-of-memory error, say, is not retried unfused)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    names = [
        (torch._dynamo.exc, "BackendCompilerFailed"),
        (torch._inductor.exc, "InductorError"),
        (torch._inductor.exc, "CppCompileError"),
        (torch._inductor.exc, "InvalidCxxCompiler"),
    ]
    return tuple(getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type))


class StepError(RuntimeError):
    """A step mode that cannot run here as configured."""


def resolve(step: str, deterministic: bool, device: torch.device, preloaded: bool) -> str:
    """The mode a run's steps take: `auto` is `compiled` on CUDA (`graph` when deterministic:
    Inductor picks kernels by timing them) and `eager` on a CPU, where the op-by-op loop is
    what every number so far was measured with."""
    if step == "auto":
        if device.type != "cuda" or not preloaded:
            return "eager"
        return "graph" if deterministic else "compiled"
    if step != "eager" and not preloaded:
        raise StepError(
            f"train.step={step} reads every batch from the images in device memory, but they "
            "are not preloaded there (data.preload=never, or too little free memory); use "
            "data.preload=always or train.step=eager"
        )
    return step


def describe(mode: str, device: torch.device) -> str:
    """What `mode` means on `device`, for result.json and logs."""
    graphed = device.type == "cuda"
    return {
        "eager": "eager (op by op)",
        "graph": "one CUDA graph a step" if graphed else "graph step, op by op (no CUDA)",
        "compiled": "compiled, one CUDA graph a step" if graphed else "compiled (no CUDA graph)",
    }[mode]


def gather_crops(
    images: Tensor,
    slot: Tensor,
    top: Tensor,
    left: Tensor,
    flip: Tensor,
    size: int,
    mean: Tensor,
    std: Tensor | None,
) -> Tensor:
    """Normalised (B, size, size, 3) crops straight from the stored uint8 images: each pixel
    gathered once and its mean (a mean image's pixel at the same place, or the channel's)
    subtracted. The numbers of `Normalize.crops` on `store.batch`, without the whole images."""
    ar = torch.arange(size, device=images.device)
    rows = (top[:, None] + ar)[:, :, None]
    cols = left[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    x = images[slot[:, None, None], rows, cols].float()
    x = x - (mean[rows, cols] if mean.ndim == 3 else mean)
    return x if std is None else x / std


def step_loss(
    model: nn.Module,
    images: Tensor,
    mean: Tensor,
    std: Tensor | None,
    chunk: dict[str, Tensor],
    k: Tensor,
    x: Tensor | None,
    crop: int,
    channels_last: bool,
    bf16: bool,
    weights: tuple[tuple[str, float], ...],
) -> tuple[Tensor, Tensor]:
    """The step's loss and statistics (loss x rows, rows, then each head's correct and labelled
    rows) from row k of a chunk. `x`: a ready input instead of the gathered one (the model-only
    bound of `benchmarks/train_throughput.py`)."""

    def at(name: str) -> Tensor:
        return chunk[name].index_select(0, k)[0]

    if x is None:
        crops = gather_crops(images, at("slot"), at("top"), at("left"), at("flip"), crop, mean, std)
        x = to_input(crops, channels_last)
    masks = list(at("masks").unbind(0)) if "masks" in chunk else None
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = model(x, masks)
    loss = torch.zeros((), device=x.device)
    stats = []
    for head, weight in weights:
        logits, y = out[head], at(head)
        labelled = y >= 0
        count = labelled.sum()
        # the mean over labelled rows, 0 when none (`models.labelled_losses`), with no host wait
        ce = F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum")
        loss = loss + weight * (ce / count.clamp(min=1))
        stats += [((logits.argmax(1) == y) & labelled).sum(), count]
    rows = float(x.shape[0])
    n = torch.full((), rows, device=x.device)
    return loss, torch.stack([loss.detach() * rows, n, *(s.float() for s in stats)])


def compiled_step_loss() -> Callable[..., tuple[Tensor, Tensor]]:
    """`step_loss` compiled once per process; each new shape (task, crop, batch) compiles once."""
    global _compiled
    if _compiled is None:
        import torch._dynamo

        # a suite compiles a handful of shapes (three tasks, pretraining, the benchmark's bound)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        _compiled = torch.compile(step_loss, dynamic=False)
    return _compiled


class GraphStep:
    """A run's steps through `step_loss`, replayed as one CUDA graph on CUDA. Holds every tensor
    the graph reads (a replayed graph reads the addresses it was captured with), so it lives as
    long as the run's training does."""

    def __init__(self, run: Run, compiled: bool) -> None:
        self.run = run
        store, config = run.data.store, run.config
        if store.data is None:
            raise StepError("a graph step needs the images in device memory")
        self.images = store.data
        self.slots = torch.from_numpy(np.asarray(store.slots))  # store position -> image
        self.mean, self.std = run.data.normalize.on(store.data)
        self.fn = compiled_step_loss() if compiled else step_loss
        self.graphed = run.device.type == "cuda"
        self.capture = self.graphed  # until a capture fails
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.notes: list[str] = []  # what did not go as planned (compiling, capturing)
        self._kept: list[tuple[torch.cuda.CUDAGraph, Callable[[], None]]] = []  # model_only's
        self.heads = list(run.model.heads)
        t = config.train
        self.options: dict[str, Any] = {
            "crop": config.data.crop,
            "channels_last": run.channels_last,
            "bf16": t.precision == "bf16" and run.device.type == "cuda",
            "weights": tuple(
                (h, {"age": t.age_weight, "gender": t.gender_weight}[h]) for h in self.heads
            ),
        }
        batch, device = config.data.batch_size, run.device
        drops = run.dropouts
        groups = run.optimizer.param_groups
        self.chunk = self._buffers(CHUNK, batch, device)
        self.k = torch.zeros(1, dtype=torch.long, device=device)
        self.sums = torch.zeros(2 + 2 * len(self.heads), device=device)
        # each group reads its rate from here, set inside the step (fused optimisers take it)
        self.lr = torch.zeros(len(groups), device=device)
        for i, group in enumerate(groups):
            group["lr"] = self.lr[i]
        self.base = [float(b) for b in run.scheduler.base_lrs]
        self.factor = run.scheduler.lr_lambdas[0]
        self.masks_shape = (len(drops), drops[0].features) if drops else None

    def _buffers(self, steps: int, batch: int, device: torch.device) -> dict[str, Tensor]:
        names = ("slot", "top", "left", *self.heads)
        out = {n: torch.zeros(steps, batch, dtype=torch.long, device=device) for n in names}
        out["flip"] = torch.zeros(steps, batch, dtype=torch.bool, device=device)
        out["lr"] = torch.zeros(steps, len(self.run.optimizer.param_groups), device=device)
        drops = self.run.dropouts
        if drops:
            shape = (steps, len(drops), batch, drops[0].features)
            out["masks"] = torch.zeros(shape, dtype=torch.bool, device=device)
        return out

    def _host(self, chunk: Drawn, first: int, steps: int, rows: int) -> dict[str, Tensor]:
        """Steps first..first+steps of a chunk (each of `rows` rows) in the buffers' layout."""
        start = sum(chunk.sizes[:first])
        it = self.run.iteration  # step `first`'s
        cut = slice(start, start + steps * rows)
        r = chunk.rows
        out = {
            "slot": self.slots[r["positions"][cut]],
            "top": r["top"][cut],
            "left": r["left"][cut],
            "flip": r["flip"][cut],
            **{h: r[h][cut] for h in self.heads},
        }
        out = {n: v.reshape(steps, rows) for n, v in out.items()}
        out["lr"] = torch.tensor(
            [[b * self.factor(it + s) for b in self.base] for s in range(steps)],
            dtype=torch.float64,
        ).float()  # the rate each step's LambdaLR would set, rounded as the kernel rounds it
        if chunk.masks is not None and self.masks_shape is not None:
            layers, features = self.masks_shape
            m = chunk.masks[start * layers : (start + steps * rows) * layers]
            out["masks"] = m.reshape(steps, layers, rows, features)
        return out

    def train(self, chunk: Drawn, progress: Callable[[], None]) -> None:
        """A chunk's steps: its full batches from the buffers (replayed), a short one eagerly."""
        batch = self.run.config.data.batch_size
        full = 0
        while full < len(chunk.sizes) and chunk.sizes[full] == batch:
            full += 1
        if full:
            host = self._host(chunk, 0, full, batch)
            for name, value in host.items():
                _copy(self.chunk[name][:full], value)
            self.k.zero_()
            for _ in range(full):
                self._full_step()
                self.run.iteration += 1
                progress()
        for s in range(full, len(chunk.sizes)):
            host = self._host(chunk, s, 1, chunk.sizes[s])
            one = {n: to_device(v, self.run.device) for n, v in host.items()}
            k = torch.zeros(1, dtype=torch.long, device=self.run.device)
            with self._alone():  # its backward must not run beside another fold's capture
                self._step(one, k, step_loss)
            self.run.iteration += 1
            progress()

    def _step(
        self,
        chunk: dict[str, Tensor],
        k: Tensor,
        fn: Callable[..., tuple[Tensor, Tensor]],
        x: Tensor | None = None,
    ) -> None:
        """One step (what the graph holds): the rate, forward and loss, backward, optimiser,
        statistics, the next row. Gradients are zeroed in place, never freed: the graph's
        backward accumulates into the tensors it was captured with. `x`: a ready input, and
        the same row again (`model_only`)."""
        run = self.run
        self.lr.copy_(chunk["lr"].index_select(0, k)[0])
        loss, stats = fn(run.model, self.images, self.mean, self.std, chunk, k, x, **self.options)
        loss.backward()  # type: ignore[no-untyped-call]
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=False)
        self.sums.add_(stats)
        if x is None:
            k.add_(1)

    @property
    def note(self) -> str | None:
        """What did not go as planned, for result.json; None when all did."""
        return "; ".join(self.notes) or None

    def _alone(self) -> contextlib.AbstractContextManager[Any]:
        """One fold at a time: the first steps (the first call compiles) and, on CUDA, all that
        runs outside the graph (captures, eager steps: no backward beside another fold's
        capture). Replays need no turn."""
        alone = self.graphed or self.warm < WARMUP
        return _one_at_a_time if alone else contextlib.nullcontext()

    def _full_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        with self._alone():
            if self.warm == 0 and self.fn is not step_loss:
                self._first_compiled_step()
                self.warm += 1
                return
            if self.warm < WARMUP or not self.capture:
                self._step(self.chunk, self.k, self.fn)
                self.warm += 1
                return
            self.graph = self._capture(lambda: self._step(self.chunk, self.k, self.fn))
        if self.graph is not None:
            self.graph.replay()
        else:
            with self._alone():
                self._step(self.chunk, self.k, self.fn)

    def _first_compiled_step(self) -> None:
        """The call that compiles. Compiling can fail where training cannot (Triton builds its
        launcher with the system's C compiler, which a slim container may lack): the step then
        runs unfused, still as one graph, and says why. Nothing ran before the compiler gave
        up, so the step is simply taken again."""
        buffers = [b.clone() for b in self.run.model.buffers()]  # batch norm's statistics
        try:
            self._step(self.chunk, self.k, self.fn)
        except compile_errors() as exc:
            # the forward may have run before the backward failed to compile: undo what it did
            with torch.no_grad():
                for b, saved in zip(self.run.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            self.run.optimizer.zero_grad(set_to_none=False)
            self.sums.zero_()
            self.fn = step_loss
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.notes.append(f"torch.compile failed, the step runs unfused: {why}")
            self._step(self.chunk, self.k, self.fn)

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        """`step` recorded on the run's own stream (`runtime.own_stream`); other folds' threads
        go on meanwhile (thread-local capture mode). Nothing runs while capturing, so a capture
        that fails leaves the run as it was: it then trains op by op, and says so."""
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.run.device)
        # Adam(W) refuses to be captured unless its groups say `capturable` (the fused kernels
        # it runs here take the step count and rate from the device either way)
        groups = [g for g in self.run.optimizer.param_groups if "capturable" in g]
        before = [g["capturable"] for g in groups]
        try:
            for g in groups:
                g["capturable"] = True
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                step()
        except RuntimeError as exc:
            self.capture = False
            self.notes.append(f"CUDA graph capture failed, trained op by op: {str(exc)[:200]}")
            return None
        finally:
            for g, b in zip(groups, before, strict=True):
                g["capturable"] = b
        return graph

    def model_only(self, x: Tensor) -> Callable[[], None]:
        """The step on a ready input, on the loaded chunk's current row again and again, as the
        run trains it (captured on CUDA after a warm-up): the bound the whole step is measured
        against (`benchmarks/train_throughput.py`). It trains the model: a benchmark's run."""

        def step() -> None:
            self._step(self.chunk, self.k, self.fn, x)

        self.k.zero_()  # a row of the loaded chunk that is surely there
        for _ in range(WARMUP):
            step()
        graph = self._capture(step) if self.capture else None
        if graph is None:
            return step
        # kept as long as the training graph: a graph let go clears the cuBLAS workspaces of
        # the stream it was captured on, which the training graph captured on it still uses
        self._kept.append((graph, step))
        return graph.replay

    def close(self) -> None:
        """Let the graphs go once the run's queued work is done, one fold at a time (releasing
        a graph's memory and workspaces must not overlap another fold's capture)."""
        if self.graphed:
            torch.cuda.current_stream(self.run.device).synchronize()
        with self._alone():
            self.graph = None
            self._kept.clear()

    def epoch_sums(self) -> dict[str, float]:
        """The epoch's statistics (the one wait for the device), reset for the next epoch; the
        scheduler brought to the iteration, as the eager loop's per-step calls leave it."""
        values = self.sums.tolist()
        self.sums.zero_()
        sched = self.run.scheduler
        sched.last_epoch = self.run.iteration
        sched._last_lr = [b * self.factor(sched.last_epoch) for b in self.base]
        out = {"loss": values[0], "n": values[1]}
        for i, head in enumerate(self.heads):
            out[f"{head}_correct"], out[f"{head}_n"] = values[2 + 2 * i], values[3 + 2 * i]
        return out


def _copy(into: Tensor, value: Tensor) -> None:
    """Into a buffer the graph reads, queued on the run's stream after the steps before it."""
    if into.is_cuda:
        into.copy_(value.pin_memory(), non_blocking=True)
    else:
        into.copy_(value)
