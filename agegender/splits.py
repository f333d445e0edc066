"""Train / validation / test splits of one cross-validation fold.

`subject_disjoint` (default) holds out whole users for validation, so model selection never sees
a person (or a Flickr album) that training saw. `levi_hassner` reproduces the published lists as
they are; their validation rows are a random 10 % of rows, so they share users with training and
validation scores are optimistic. We report that rather than hide it.

Adience users are few and lopsided (one Flickr album is often one family at one age), so a random
10 % of users gives a validation set whose label mix is far from training's (on the real metadata
one fold's random choice is 69 % "25-32"). With `stratify` (default) the validation users are chosen
to match training's age and gender distribution; see `_stratified_users`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.adience import IntArray, Labels, MetadataError, Table, list_file, read_list
from agegender.config import SplitConfig
from agegender.labels import AGE_GROUPS, GENDERS

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

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

    def label_counts(self, name: str) -> dict[str, dict[str, int]]:
        """A part's labelled rows per age group and per gender (list entries for levi_hassner)."""
        part = self.part(name)
        ages = np.bincount(self.labels.age[part.age], minlength=len(AGE_GROUPS))
        genders = np.bincount(self.labels.gender[part.gender], minlength=len(GENDERS))
        return {
            "age_groups": dict(zip(AGE_GROUPS, map(int, ages), strict=True)),
            "genders": dict(zip(GENDERS, map(int, genders), strict=True)),
        }

    def summary(self, table: Table) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fold": self.fold,
            "protocol": self.config.protocol,
            "age_policy": self.config.age_policy,
        }
        if self.config.protocol == "subject_disjoint":
            out |= {
                "seed": self.config.seed,
                "val_fraction": self.config.val_fraction,
                "stratified": self.config.stratify,
            }
        for p in PARTS:
            part = self.part(p)
            out[p] = {
                "rows": len(part.rows),
                "age": len(part.age),
                "gender": len(part.gender),
                "users": len({table.users[i] for i in part.rows}),
            } | self.label_counts(p)
        out["shared_users"] = self.shared_users(table)
        out["notes"] = list(self.notes)
        return out


def distribution_line(split: Split, table: Table, part: str = "val") -> str:
    """One human line: a part's size and label mix, e.g.
    `val 1,234 rows, 14 users: age 0-2 9% | 4-6 12% | ... ; gender m 47% f 53%`."""
    rows = split.part(part).rows
    n_users = len({table.users[i] for i in rows})
    counts = split.label_counts(part)

    def shares(c: dict[str, int], sep: str) -> str:
        total = max(sum(c.values()), 1)
        return sep.join(f"{k} {100 * v / total:.0f}%" for k, v in c.items())

    return (
        f"{part} {len(rows):,} rows, {n_users:,} users: "
        f"age {shares(counts['age_groups'], ' | ')} ; gender {shares(counts['genders'], ' ')}"
    )


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
    if config.stratify:
        counts = _user_counts(labels, users, ~in_test, others)
        chosen = np.flatnonzero(_stratified_users(counts, n_val, config.val_fraction, rng))
    else:
        chosen = rng.permutation(len(others))[:n_val]
    val_users = [others[i] for i in chosen]
    in_val = ~in_test & np.isin(users, val_users)
    in_train = ~in_test & ~in_val

    def part(mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Part:
        idx = np.flatnonzero(mask).astype(np.int64)
        return Part(age=_labelled(idx, labels.age_mask), gender=_labelled(idx, labels.gender_mask))

    split = Split(fold, config, part(in_train), part(in_val), part(in_test), labels)
    shared = split.shared_users(table)
    if any(shared.values()):  # cannot happen by construction; guards against future edits
        raise AssertionError(f"subject_disjoint split of fold {fold} shares users: {shared}")
    return split


def _user_counts(
    labels: Labels, users: npt.NDArray[np.str_], rows: BoolArray, names: list[str]
) -> FloatArray:
    """Per user (in `names` order), over `rows`: 8 age-group counts, 2 gender counts and the
    number of labelled rows, as columns."""
    idx = np.flatnonzero(rows)
    user = np.searchsorted(names, users[idx])  # names is sorted and holds every user of `rows`
    counts = np.zeros((len(names), len(AGE_GROUPS) + len(GENDERS) + 1))
    age, gender = labels.age[idx], labels.gender[idx]
    np.add.at(counts, (user[age >= 0], age[age >= 0]), 1)
    np.add.at(counts, (user[gender >= 0], len(AGE_GROUPS) + gender[gender >= 0]), 1)
    np.add.at(counts[:, -1], user[(age >= 0) | (gender >= 0)], 1)
    return counts


def _mismatch(val: FloatArray, total: FloatArray, fraction: float) -> FloatArray:
    """How far validation (count rows `val`, any leading shape) is from a miniature of training:
    total-variation distance of the age and of the gender distributions, plus the relative miss of
    the validation share of labelled rows (so it neither shrinks to small users nor grows)."""

    def tv(a: FloatArray, b: FloatArray) -> FloatArray:
        a = a / np.maximum(a.sum(-1, keepdims=True), 1)
        b = b / np.maximum(b.sum(-1, keepdims=True), 1)
        return np.asarray(0.5 * np.abs(a - b).sum(-1))

    train = total - val
    a, g = len(AGE_GROUPS), len(AGE_GROUPS) + len(GENDERS)
    share = val[..., -1] / max(total[-1], 1)
    out = tv(val[..., :a], train[..., :a]) + tv(val[..., a:g], train[..., a:g])
    return np.asarray(out + np.abs(share - fraction) / fraction)


def _stratified_users(
    counts: FloatArray, n_val: int, fraction: float, rng: np.random.Generator, restarts: int = 16
) -> BoolArray:
    """Which `n_val` users (rows of `counts`, see `_user_counts`) to hold out for validation.

    A random choice of ~13 Adience users has a badly skewed label mix (up to 0.48 total-variation
    distance from training's age distribution), which makes model selection noisy. Local search:
    from a seeded random choice, swap the one validation user for the one training user that
    most lowers `_mismatch` (all pairs at once), until no swap helps; keep the best of
    `restarts` starts. Users without a labelled row are left out (they would be empty places in
    validation). Tens of milliseconds a fold.
    """
    pool = np.flatnonzero(counts[:, -1] > 0)
    if len(pool) <= n_val:
        pool = np.arange(len(counts))
    c, total = counts[pool], counts.sum(0)
    best, best_score = np.zeros(len(c), dtype=bool), np.inf
    for _ in range(restarts):
        val = np.zeros(len(c), dtype=bool)
        val[rng.permutation(len(c))[:n_val]] = True
        sums = c[val].sum(0)
        score = float(_mismatch(sums, total, fraction))
        while not val.all():
            out, into = np.flatnonzero(val), np.flatnonzero(~val)
            swapped = sums - c[out][:, None] + c[into][None]  # (out, into, columns)
            scores = _mismatch(swapped, total, fraction)
            i, j = np.unravel_index(np.argmin(scores), scores.shape)
            if scores[i, j] >= score - 1e-12:
                break
            val[out[i]], val[into[j]] = False, True
            sums, score = swapped[i, j], float(scores[i, j])
        if score < best_score:
            best, best_score = val, score
    chosen = np.zeros(len(counts), dtype=bool)
    chosen[pool[best]] = True
    return chosen


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
