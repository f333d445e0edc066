"""One fold's images and targets, ready for batched training and evaluation on a device."""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from agegender.cache import ImageCache
from agegender.config import DataConfig, Task
from agegender.labels import NO_LABEL
from agegender.splits import PARTS, Split
from agegender.transforms import Normalize


@dataclass(frozen=True)
class PartData:
    """A train/val/test part: positions in the image store and the targets (-1 = no label)."""

    index: Tensor
    age: Tensor
    gender: Tensor
    rows: npt.NDArray[np.int64]  # rows of the cache table, for per-image outputs

    def __len__(self) -> int:
        return len(self.index)


class ImageStore:
    """The fold's uint8 images: in device memory when they fit, else read per batch.

    All of Adience at 256 px is 3.8 GB, so on a GPU (or in RAM) it is normally preloaded and a
    batch is one on-device gather; otherwise batches come from the page-cached memmap. The
    preloaded copy is the whole cache's and is shared by every fold of the process on that
    device (`shared_images`): eight folds on one GPU hold one copy, not eight.
    """

    def __init__(
        self,
        cache: ImageCache,
        rows: npt.NDArray[np.int64],
        device: torch.device,
        preload: str = "auto",
    ) -> None:
        self.device = device
        self.slots = cache.slots[rows]
        self.source = cache.images
        self.data: Tensor | None = None
        self._slots_on: Tensor | None = None
        if preload == "always" or (
            preload == "auto" and cache.images.nbytes < _free_bytes(device) / 2
        ):
            self.data = shared_images(cache, device)
            self._slots_on = torch.from_numpy(self.slots).to(device)

    @property
    def preloaded(self) -> bool:
        return self.data is not None

    @property
    def side(self) -> tuple[int, int]:
        return int(self.source.shape[1]), int(self.source.shape[2])

    def batch(self, positions: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) on the device."""
        if self.data is not None and self._slots_on is not None:
            return self.data[self._slots_on[positions.to(self.device)]]
        host = torch.from_numpy(self.source[self.slots[positions.numpy()]])
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host


_shared: weakref.WeakValueDictionary[tuple[str, str, str], Tensor] = weakref.WeakValueDictionary()
_loading = threading.Lock()


def shared_images(cache: ImageCache, device: torch.device) -> Tensor:
    """All of a cache's images on `device`, loaded once per process while any fold holds them
    (folds training in threads at once share it; it is freed when the last one is done)."""
    key = (str(cache.path.resolve()), cache.fingerprint, str(device))
    with _loading:
        images = _shared.get(key)
        if images is None:
            images = torch.empty(cache.images.shape, dtype=torch.uint8, device=device)
            for i in range(0, len(images), 1024):  # sequential reads from the memmap
                images[i : i + 1024] = torch.from_numpy(np.array(cache.images[i : i + 1024]))
            if device.type == "cuda":  # other folds read it from their own streams
                torch.cuda.current_stream(device).synchronize()
            _shared[key] = images
    if device.type == "cuda":  # freed only once this fold's stream is done with it too
        images.record_stream(torch.cuda.current_stream(device))
    return images


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 0.0


@dataclass(frozen=True)
class FoldData:
    train: PartData
    val: PartData
    test: PartData
    store: ImageStore
    normalize: Normalize

    def part(self, name: str) -> PartData:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _task_rows(split: Split, part: str, task: Task) -> npt.NDArray[np.int64]:
    p = split.part(part)
    return {"multitask": p.rows, "age": p.age, "gender": p.gender}[task]


def _permute_labelled(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Shuffle the labels among the rows that have one (the control keeps the label counts)."""
    out = labels.clone()
    have = torch.nonzero(labels != NO_LABEL).flatten()
    out[have] = labels[have][torch.randperm(len(have), generator=generator)]
    return out


def fold_data(
    cache: ImageCache,
    split: Split,
    task: Task,
    config: DataConfig,
    device: torch.device,
    generator: torch.Generator,
) -> FoldData:
    """An Adience fold: the split's parts, with the targets of `task`."""
    rows = {p: _task_rows(split, p, task) for p in PARTS}
    for p, r in rows.items():
        if len(r) == 0:
            raise ValueError(f"fold {split.fold}: the {p} part has no rows with a {task} label")
    return parts_data(
        cache, rows, split.labels.age, split.labels.gender, task, config, device, generator
    )


def parts_data(
    cache: ImageCache,
    rows: dict[str, npt.NDArray[np.int64]],
    age: npt.NDArray[np.int64],
    gender: npt.NDArray[np.int64],
    task: Task,
    config: DataConfig,
    device: torch.device,
    generator: torch.Generator,
) -> FoldData:
    """Targets per part (cache rows -> `age` / `gender` labels), the image store and the
    training part's normalisation; any dataset, once its rows are split."""
    stored = np.unique(np.concatenate(list(rows.values())))
    store = ImageStore(cache, stored, device, config.preload)
    parts = {}
    for p, r in rows.items():
        a = torch.from_numpy(age[r]) if task != "gender" else torch.full((len(r),), NO_LABEL)
        g = torch.from_numpy(gender[r]) if task != "age" else torch.full((len(r),), NO_LABEL)
        if config.shuffle_labels and p != "test":
            a, g = _permute_labelled(a, generator), _permute_labelled(g, generator)
        index = torch.from_numpy(np.searchsorted(stored, r))
        parts[p] = PartData(index=index, age=a.long(), gender=g.long(), rows=r)
    train_slots = np.unique(cache.slots[rows["train"]])
    if config.norm_images is not None and config.norm_images < len(train_slots):
        picks = np.linspace(0, len(train_slots) - 1, config.norm_images).astype(int)
        train_slots = np.unique(train_slots[picks])
    normalize = Normalize.measure(cache.images, train_slots, config.normalize)
    return FoldData(parts["train"], parts["val"], parts["test"], store, normalize)
