"""Train / validation / test splits of one cross-validation fold.

`subject_disjoint` (default) holds out whole users for validation, so model selection never sees
a person (or a Flickr album) that training saw. `levi_hassner` reproduces the published lists as
they are; their validation rows are a random 10 % of rows, so they share users with training and
validation scores are optimistic. We report that rather than hide it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.adience import IntArray, Labels, MetadataError, Table, list_file, read_list
from agegender.config import SplitConfig

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Part:
    """Row indices (into the table) that carry each task's label; lists may repeat rows."""

    age: IntArray
    gender: IntArray

    @property
    def rows(self) -> IntArray:
        return np.union1d(self.age, self.gender)


@dataclass(frozen=True)
class Split:
    fold: int
    config: SplitConfig
    train: Part
    val: Part
    test: Part
    labels: Labels  # per table row
    notes: tuple[str, ...] = field(default=())

    def part(self, name: str) -> Part:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def shared_users(self, table: Table) -> dict[str, int]:
        users = {p: {table.users[i] for i in self.part(p).rows} for p in PARTS}
        return {f"{a}-{b}": len(users[a] & users[b]) for a, b in combinations(PARTS, 2)}

    def summary(self, table: Table) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fold": self.fold,
            "protocol": self.config.protocol,
            "age_policy": self.config.age_policy,
        }
        if self.config.protocol == "subject_disjoint":
            out |= {"seed": self.config.seed, "val_fraction": self.config.val_fraction}
        for p in PARTS:
            part = self.part(p)
            out[p] = {
                "rows": len(part.rows),
                "age": len(part.age),
                "gender": len(part.gender),
                "users": len({table.users[i] for i in part.rows}),
            }
        out["shared_users"] = self.shared_users(table)
        out["notes"] = list(self.notes)
        return out


def make_split(table: Table, fold: int, config: SplitConfig | None = None) -> Split:
    config = config or SplitConfig()
    if fold not in set(table.folds.tolist()):
        raise ValueError(
            f"fold {fold} has no rows in this table (folds: {sorted(table.duplicates)})"
        )
    if config.protocol == "levi_hassner":
        return _levi_hassner(table, fold, config)
    return _subject_disjoint(table, fold, config)


def _labelled(idx: IntArray, mask: npt.NDArray[np.bool_]) -> IntArray:
    keep: IntArray = idx[mask[idx]]
    return keep


def _subject_disjoint(table: Table, fold: int, config: SplitConfig) -> Split:
    labels = table.labels(config.age_policy)
    users = np.array(table.users)
    in_test = table.folds == fold
    others = sorted(set(users[~in_test].tolist()))
    crossing = sorted(set(users[in_test].tolist()) & set(others))
    if crossing:
        raise ValueError(
            f"users {crossing[:5]} occur in fold {fold} and in other folds: the metadata folds are "
            "not user-disjoint, so no subject-disjoint split exists"
        )
    rng = np.random.default_rng([config.seed, fold])
    n_val = max(1, round(config.val_fraction * len(others)))
    val_users = {others[i] for i in rng.permutation(len(others))[:n_val]}
    in_val = ~in_test & np.isin(users, sorted(val_users))
    in_train = ~in_test & ~in_val

    def part(mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Part:
        idx = np.flatnonzero(mask).astype(np.int64)
        return Part(age=_labelled(idx, labels.age_mask), gender=_labelled(idx, labels.gender_mask))

    split = Split(fold, config, part(in_train), part(in_val), part(in_test), labels)
    shared = split.shared_users(table)
    if any(shared.values()):  # cannot happen by construction; guards against future edits
        raise AssertionError(f"subject_disjoint split of fold {fold} shares users: {shared}")
    return split


def _levi_hassner(table: Table, fold: int, config: SplitConfig) -> Split:
    assert config.lists is not None
    # The lists only contain the eight exact strings, so their labels are the strict policy's.
    labels = table.labels("strict")
    parts: dict[str, dict[str, IntArray]] = {p: {} for p in PARTS}
    missing = 0
    for task, task_labels in (("age", labels.age), ("gender", labels.gender)):
        for p in PARTS:
            path = list_file(config.lists, fold, task, p)
            idx = []
            for entry in read_list(path):
                i = table.index_of_path.get(entry.path)
                if i is None:
                    missing += 1  # image skipped by the cache (reported there)
                    continue
                if task_labels[i] != entry.label:
                    raise MetadataError(
                        path,
                        entry.line,
                        f"{task} label {entry.label} disagrees with the metadata "
                        f"({table.rows[i].source}: {getattr(table.rows[i], task)!r})",
                    )
                idx.append(i)
            parts[p][task] = np.array(idx, dtype=np.int64)
    train, val, test = (Part(age=parts[p]["age"], gender=parts[p]["gender"]) for p in PARTS)
    split = Split(fold, config, train, val, test, labels)
    shared = split.shared_users(table)["train-val"]
    notes = [
        f"levi_hassner: the published validation list shares {shared} users with training "
        "(rows, not users, were sampled), so validation scores are optimistic"
    ]
    if missing:
        notes.append(
            f"levi_hassner: {missing} listed images are not in this table and were left out"
        )
    return replace(split, notes=tuple(notes))
