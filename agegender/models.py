"""The Levi-Hassner CNN (Caffe original), with multi-task or single-task heads.

Three conv blocks and two 512-unit fully connected layers, exactly as the Caffe prototxt:
11,416,074 parameters for the multi-task net at 227x227. The input side is configuration: the
same topology runs on 64 px crops for CPU tests and demos (fc6 then sees a 1x1 map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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
    results depend on scheduling.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return nn.functional.dropout(x, self.p, training=True)
        keep = torch.empty(x.shape, device=self.generator.device).bernoulli_(
            1 - self.p, generator=self.generator
        )
        return x * keep.to(x.device, x.dtype) / (1 - self.p)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "lrn":
        return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)  # Caffe's alpha / n too
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
            SeededDropout(config.dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            SeededDropout(config.dropout),
        )
        sizes = classes if classes is not None else HEADS[task]
        self.heads = nn.ModuleDict({n: nn.Linear(512, k) for n, k in sizes.items()})
        self.task = task
        self.crop = crop

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.fc(self.features(x))
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
        for m in self.modules():
            if isinstance(m, SeededDropout):
                m.generator = generator

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Caffe's init: conv N(0, 0.01); fc6/fc7 N(0, 0.005), bias 1; heads N(0, 0.01)."""
        layers: list[tuple[nn.Module, float, float]] = [
            *((m, 0.01, 0.0) for m in self.features if isinstance(m, nn.Conv2d)),
            *((m, 0.005, 1.0) for m in self.fc if isinstance(m, nn.Linear)),
            *((m, 0.01, 0.0) for m in self.heads.values()),
        ]
        for layer, std, bias in layers:
            assert isinstance(layer, nn.Conv2d | nn.Linear)
            assert layer.bias is not None
            nn.init.normal_(layer.weight, 0.0, std, generator=generator)
            nn.init.constant_(layer.bias, bias)


def build_model(
    task: Task,
    crop: int,
    config: ModelConfig | None = None,
    seed: int | None = None,
    classes: dict[str, int] | None = None,
) -> LeviHassner:
    model = LeviHassner(task, crop, config, classes)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model.reset_parameters(gen)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
