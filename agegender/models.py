"""The Levi-Hassner CNN (Caffe original), with multi-task or single-task heads.

Three conv blocks and two 512-unit fully connected layers, exactly as the Caffe prototxt:
11,416,074 parameters for the multi-task net at 227x227. The input side is configuration: the
same topology runs on 64 px crops for CPU tests and demos (fc6 then sees a 1x1 map).

The net's input layout (`to_input`), precision (`autocast`) and per-head loss (`masked_losses`)
live here too: training, evaluation and prediction all use them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agegender.config import ModelConfig, Task

HEADS: dict[str, dict[str, int]] = {
    "multitask": {"age": 8, "gender": 2},
    "age": {"age": 8},
    "gender": {"gender": 2},
}


def _pooled(n: int) -> int:
    """Side after a 3x3 / stride-2 max-pool with Caffe's ceil rounding."""
    return math.ceil((n - 3) / 2) + 1


def feature_side(crop: int) -> int:
    """Side of conv3's pooled output: 227 -> 56 -> 28 -> 14 -> 7."""
    return _pooled(_pooled(_pooled((crop - 7) // 4 + 1)))


class SeededDropout(nn.Module):
    """Dropout that draws its mask from a given generator, not torch's global one.

    Several folds may train concurrently in one process; a shared global RNG would make their
    results depend on scheduling. Training passes each step's keep-mask in (`LeviHassner`'s
    `masks`): `agegender.steps` draws a chunk of steps' masks ahead, from this layer's generator
    in the order the layers use them, already on the device (drawing here would copy a CPU mask
    to the GPU, a host wait, twice a step; and a captured step must read its masks from fixed
    tensors).
    """

    def __init__(self, p: float, features: int) -> None:
        super().__init__()
        self.p = p
        self.features = features  # a mask's row: what steps.plan draws
        self.generator: torch.Generator | None = None

    def draw(self, rows: int) -> Tensor:
        """The keep-mask of `rows` inputs, from the generator (on its device)."""
        assert self.generator is not None
        keep = torch.empty((rows, self.features), device=self.generator.device)
        return keep.bernoulli_(1 - self.p, generator=self.generator)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if keep is None:
            if self.generator is None:
                return nn.functional.dropout(x, self.p, training=True)
            keep = self.draw(x.shape[0])
        return x * keep.to(x.device, x.dtype) / (1 - self.p)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


class LRN(nn.Module):
    """Caffe's across-channel LRN: x / (k + alpha / n * sum of x^2 over n neighbours)^beta.

    The same as `nn.LocalResponseNorm`, written with five shifted adds instead of avg_pool3d,
    whose CUDA backward has no deterministic implementation (`train.deterministic`).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        sq = nn.functional.pad(x * x, (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))
        window = sum(sq[:, i : i + c] for i in range(self.size))
        return x / (self.k + self.alpha / self.size * window) ** self.beta


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "lrn":
        return LRN(size=5, alpha=1e-4, beta=0.75, k=1.0)
    return nn.BatchNorm2d(channels)


class LeviHassner(nn.Module):
    def __init__(
        self,
        task: Task = "multitask",
        crop: int = 227,
        config: ModelConfig | None = None,
        classes: dict[str, int] | None = None,
    ):
        """`classes` (head -> classes) replaces Adience's head sizes, e.g. CelebA's binary age."""
        super().__init__()
        self.frozen = False
        config = config or ModelConfig()
        side = feature_side(crop)
        if side < 1:
            raise ValueError(f"crop {crop} is too small for the Levi-Hassner net (minimum 23)")
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=4),
            nn.ReLU(inplace=True),
            _pool(),
            _norm(config.norm, 96),
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            _pool(),
            _norm(config.norm, 256),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            _pool(),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(384 * side * side, 512),
            nn.ReLU(inplace=True),
            SeededDropout(config.dropout, 512),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            SeededDropout(config.dropout, 512),
        )
        sizes = classes if classes is not None else HEADS[task]
        self.heads = nn.ModuleDict({n: nn.Linear(512, k) for n, k in sizes.items()})
        self.task = task
        self.crop = crop

    def forward(self, x: Tensor, masks: list[Tensor] | None = None) -> dict[str, Tensor]:
        """`masks`: one keep-mask per dropout layer (`dropouts()`, in order); without them the
        layers draw their own."""
        h = self.features(x)
        kept = iter(masks or ())
        for layer in self.fc:
            if isinstance(layer, SeededDropout) and layer.p > 0:
                h = layer(h, next(kept, None))
            else:
                h = layer(h)
        return {name: head(h) for name, head in self.heads.items()}

    def freeze_features(self) -> None:
        """Fix conv1-3: no gradients, and their batch norms (if any) keep their statistics."""
        self.frozen = True
        self.features.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> LeviHassner:
        super().train(mode)
        if self.frozen:
            self.features.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.features.parameters(), *self.fc.parameters()]

    def set_generator(self, generator: torch.Generator | None) -> None:
        for m in self.dropouts():
            m.generator = generator

    def dropouts(self) -> list[SeededDropout]:
        """The dropout layers that draw masks, in the order a forward pass uses them."""
        return [m for m in self.modules() if isinstance(m, SeededDropout) and m.p > 0]

    @torch.no_grad()
    def reset_parameters(
        self, generator: torch.Generator | None = None, init: str = "caffe"
    ) -> None:
        """caffe: the released prototxt's fillers: conv N(0, 0.01) with biases 0, 1, 0 (conv1-3),
        fc6/fc7 N(0, 0.005) with bias 1, heads N(0, 0.01) with bias 0. pytorch: torch's own
        (Kaiming-uniform) init, drawn from `generator`."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        layers: list[nn.Conv2d | nn.Linear] = [
            *convs,
            *(m for m in self.fc if isinstance(m, nn.Linear)),
            *(m for m in self.heads.values() if isinstance(m, nn.Linear)),
        ]
        caffe: dict[nn.Module, tuple[float, float]] = {
            convs[0]: (0.01, 0.0),
            convs[1]: (0.01, 1.0),
            convs[2]: (0.01, 0.0),
        }
        caffe |= {m: (0.005, 1.0) for m in self.fc if isinstance(m, nn.Linear)}
        for layer in layers:
            assert layer.bias is not None
            if init == "caffe":
                std, bias = caffe.get(layer, (0.01, 0.0))
                nn.init.normal_(layer.weight, 0.0, std, generator=generator)
                nn.init.constant_(layer.bias, bias)
            else:  # as nn.Linear / nn.Conv2d.reset_parameters, but from the generator
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(layer.weight)[0])
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_model(
    task: Task,
    crop: int,
    config: ModelConfig | None = None,
    seed: int | None = None,
    classes: dict[str, int] | None = None,
) -> LeviHassner:
    model = LeviHassner(task, crop, config, classes)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model.reset_parameters(gen, (config or ModelConfig()).init)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the net's input layout, precision and loss, shared by training, evaluation and prediction


def autocast(
    device: torch.device, bf16: bool, cache: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked; a no-op elsewhere (bf16 is slow on most CPUs). A step
    captured as a CUDA graph must not keep autocast's cast weights between steps (`cache`)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def to_input(crops: Tensor, channels_last: bool) -> Tensor:
    """Normalised NHWC crops -> the net's NCHW input (channels-last in memory if asked)."""
    x = crops.permute(0, 3, 1, 2)
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


HeadTargets = tuple[Tensor | None, Tensor, int]
"""A head's labelled rows in a batch: their positions (None: all), their labels, how many."""


def labelled_rows(y: Tensor) -> HeadTargets:
    """Which rows of a batch carry the head's label (-1 = none)."""
    have = y >= 0
    count = int(have.sum())
    if count == len(y):
        return None, y, count
    return torch.nonzero(have).flatten(), y[have], count


def masked_losses(
    outputs: dict[str, Tensor], targets: dict[str, Tensor], reduction: str = "mean"
) -> dict[str, Tensor]:
    """Cross-entropy of each head over the samples that carry its label (0 when none do)."""
    return labelled_losses(outputs, {h: labelled_rows(targets[h]) for h in outputs}, reduction)


def labelled_losses(
    outputs: dict[str, Tensor], targets: dict[str, HeadTargets], reduction: str = "mean"
) -> dict[str, Tensor]:
    """`masked_losses` with the labelled rows already found (training finds them ahead on the
    CPU, `agegender.steps`: a boolean mask resolved on the device would make the host wait)."""
    out = {}
    for head, logits in outputs.items():
        positions, y, count = targets[head]
        if count == 0:
            out[head] = logits.sum() * 0.0
            continue
        picked = logits if positions is None else logits.index_select(0, positions)
        out[head] = F.cross_entropy(picked.float(), y, reduction=reduction)
    return out
