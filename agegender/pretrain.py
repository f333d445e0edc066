"""Pretraining on a larger face set (CelebA or UTKFace), whose backbone then starts Adience.

The seed's second experiment (Levi & Hassner trained from scratch): the seed pretrained on
CelebA with unpublished label files and the wrong attribute column, so it cannot be reproduced.
Here pretraining is the same training loop as a fold (`agegender.train.train`) on a source's
decode-once cache, with the source's own heads: CelebA has no ages, so its age head is binary
(`Young`), UTKFace's has Adience's 8 groups. The checkpoint tested once on the source's test part
is the one the config names (`train.test_at`): the final weights under the paper preset, the
epoch selected on the source's validation part with `best_val`. Only its backbone (conv1-3,
fc6, fc7) moves on to Adience (`model.init_from`), with fresh heads; the normalisation does not:
the backbone learned on the source minus the source's mean and is fine-tuned on Adience minus
Adience's (each measured on its own training rows).

Parts: CelebA's official partition (0 train, 1 val, 2 test). UTKFace has none and names no
identities, so its split is a seeded random split by image; one person's photos can fall into
two parts, which flatters its test numbers a little (they are not the benchmark; Adience is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from agegender.cache import SourceCache, open_source_cache
from agegender.config import Config, PretrainConfig
from agegender.data import FoldData, parts_data
from agegender.labels import GENDERS
from agegender.splits import PARTS
from agegender.train import EpochLog, FoldResult, Progress, TrainSet, train

IntArray = npt.NDArray[np.int64]


def source_parts(cache: SourceCache, pretrain: PretrainConfig) -> dict[str, IntArray]:
    """Cache rows of train / val / test: the official partition, or a seeded split by image."""
    partition = np.array([r.partition for r in cache.records], dtype=np.int64)
    if (partition >= 0).all():
        parts = {p: np.flatnonzero(partition == i) for i, p in enumerate(PARTS)}
    elif (partition < 0).all():
        order = np.random.default_rng([pretrain.seed, len(partition)]).permutation(len(partition))
        n_val = round(pretrain.val_fraction * len(order))
        n_test = round(pretrain.test_fraction * len(order))
        parts = {
            "test": np.sort(order[:n_test]),
            "val": np.sort(order[n_test : n_test + n_val]),
            "train": np.sort(order[n_test + n_val :]),
        }
    else:
        raise ValueError(f"{cache.path}: some rows have a partition and some do not")
    for p, rows in parts.items():
        if len(rows) == 0:
            raise ValueError(
                f"{cache.path}: the {cache.dataset} {p} part is empty ({len(partition)} images)"
            )
    return parts


def source_set(cache: SourceCache, config: Config, pretrain: PretrainConfig) -> TrainSet:
    """A pretraining source as a `TrainSet` for the common training loop."""
    parts = source_parts(cache, pretrain)
    age = np.array([r.age for r in cache.records], dtype=np.int64)
    gender = np.array([r.gender for r in cache.records], dtype=np.int64)
    task = config.train.task
    labelled = {
        "multitask": (age >= 0) | (gender >= 0),
        "age": age >= 0,
        "gender": gender >= 0,
    }[task]
    rows = {p: r[labelled[r]] for p, r in parts.items()}
    for p, r in rows.items():
        if len(r) == 0:
            raise ValueError(
                f"{cache.path}: no {cache.dataset} image of the {p} part has a label for "
                f"train.task={task} ({len(parts[p])} images in the part)"
            )
    official = cache.records[0].partition >= 0  # source_parts checked all agree
    if official:
        name, split = cache.dataset, "official partition"
    else:
        split = (
            f"seeded split by image (val {pretrain.val_fraction}, test "
            f"{pretrain.test_fraction}, seed {pretrain.seed})"
        )
        name = f"{cache.dataset} {split}"
    notes = () if official else (f"{cache.dataset} names no identities: {split}",)

    def load(device: torch.device, gen: torch.Generator) -> FoldData:
        return parts_data(cache, rows, age, gender, task, config.data, device, gen)

    def ids(row: int) -> list[Any]:
        r = cache.records[row]
        return [r.path, r.partition]

    return TrainSet(
        name=name,
        seed_index=0,
        cache=cache,
        classes={"age": cache.age_classes, "gender": GENDERS},
        load=load,
        ids=ids,
        id_fields=("path", "partition"),
        info={"source": cache.dataset, "split": split},
        notes=notes,
    )


def pretrain(
    cache: SourceCache | Path | str,
    config: Config,
    pretrain: PretrainConfig,
    out_dir: Path | str,
    resume: bool = False,
    log: EpochLog | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Train on the source and test once the checkpoint `train.test_at` names (final, or
    selected on its val part); `out_dir/best.pt` is it, whose backbone `model.init_from` loads."""
    cache = cache if isinstance(cache, SourceCache) else open_source_cache(cache)
    return train(source_set(cache, config, pretrain), config, out_dir, resume, log, progress)
