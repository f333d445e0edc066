"""Reading the Adience metadata (`fold_K_data.txt`) and the Levi-Hassner split lists.

Strict on purpose: a malformed row is an error naming the file, the line and what was expected,
because a silently skipped or mis-parsed row changes the benchmark without anyone noticing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.labels import AGE_GROUPS, GENDERS, NO_LABEL, AgePolicy, age_label, gender_label

N_FOLDS = 5
COLUMNS: tuple[str, ...] = (
    "user_id",
    "original_image",
    "face_id",
    "age",
    "gender",
    "x",
    "y",
    "dx",
    "dy",
    "tilt_ang",
    "fiducial_yaw_angle",
    "fiducial_score",
)
INT_COLUMNS = ("face_id", "x", "y", "dx", "dy", "tilt_ang", "fiducial_yaw_angle", "fiducial_score")

IntArray = npt.NDArray[np.int64]


class MetadataError(ValueError):
    """A metadata or list file that does not have the documented format."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class Row:
    """One metadata row, with where it came from so errors and reports can point at it."""

    fold: int
    user_id: str
    original_image: str
    face_id: int
    age: str
    gender: str
    source: str  # "fold_K_data.txt:LINE"
    raw: str = field(repr=False, compare=False)

    @property
    def path(self) -> str:
        """Image path relative to the `aligned/` folder, as the Levi-Hassner lists write it."""
        return f"{self.user_id}/landmark_aligned_face.{self.face_id}.{self.original_image}"


@dataclass(frozen=True)
class Table:
    """Deduplicated metadata rows of some folds, with label arrays computed per policy."""

    rows: tuple[Row, ...]
    duplicates: dict[int, int]  # fold -> byte-identical rows dropped
    files: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def folds(self) -> IntArray:
        return np.array([r.fold for r in self.rows], dtype=np.int64)

    @cached_property
    def users(self) -> tuple[str, ...]:
        return tuple(r.user_id for r in self.rows)

    @cached_property
    def paths(self) -> tuple[str, ...]:
        return tuple(r.path for r in self.rows)

    @cached_property
    def index_of_path(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def labels(self, policy: AgePolicy = "strict") -> Labels:
        return Labels(
            age=np.array([age_label(r.age, policy) for r in self.rows], dtype=np.int64),
            gender=np.array([gender_label(r.gender) for r in self.rows], dtype=np.int64),
        )


@dataclass(frozen=True)
class Labels:
    """Per-row targets with a mask per task: a multi-task model learns from rows with one label.

    Derived when a table is read, never stored, so changing the age policy needs no rebuild.
    """

    age: IntArray  # 0..7, NO_LABEL where absent
    gender: IntArray  # 0 = m, 1 = f, NO_LABEL where absent

    @property
    def age_mask(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.age != NO_LABEL)

    @property
    def gender_mask(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.gender != NO_LABEL)


def fold_file(metadata_dir: Path, fold: int) -> Path:
    return Path(metadata_dir) / f"fold_{fold}_data.txt"


def read_fold(path: Path, fold: int) -> tuple[list[Row], int]:
    """Rows of one fold file and the number of byte-identical duplicate rows dropped."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(path, None, "file not found (expected an Adience fold_K_data.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetadataError(
            path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    lines = text.splitlines()
    if not lines:
        raise MetadataError(path, 1, "empty file; expected a header line")
    header = tuple(h.strip() for h in lines[0].split("\t"))
    if header != COLUMNS:
        raise MetadataError(
            path,
            1,
            f"unexpected header {list(header)}; expected the 12 tab-separated columns "
            f"{list(COLUMNS)}",
        )
    rows: list[Row] = []
    seen: set[str] = set()
    duplicates = 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if line in seen:
            duplicates += 1
            continue
        seen.add(line)
        rows.append(_parse_row(line, path, lineno, fold))
    if not rows:  # a truncated download: the fold's test part would be empty, found only later
        raise MetadataError(path, 2, "no rows after the header; expected one row per face")
    return rows, duplicates


def _parse_row(line: str, path: Path, lineno: int, fold: int) -> Row:
    cells = line.split("\t")
    if len(cells) != len(COLUMNS):
        raise MetadataError(
            path, lineno, f"expected {len(COLUMNS)} tab-separated columns, found {len(cells)}"
        )
    values = dict(zip(COLUMNS, cells, strict=True))
    for name in ("user_id", "original_image"):
        if not values[name].strip() or "/" in values[name]:
            raise MetadataError(
                path,
                lineno,
                f"column {name!r} must be a non-empty file name component, got {values[name]!r}",
            )
    for name in INT_COLUMNS:
        try:
            int(values[name])
        except ValueError:
            raise MetadataError(
                path, lineno, f"column {name!r} must be an integer, got {values[name]!r}"
            ) from None
    return Row(
        fold=fold,
        user_id=values["user_id"],
        original_image=values["original_image"],
        face_id=int(values["face_id"]),
        age=values["age"],
        gender=values["gender"],
        source=f"{path.name}:{lineno}",
        raw=line,
    )


def read_metadata(metadata_dir: Path | str, folds: Iterable[int] = range(N_FOLDS)) -> Table:
    """All rows of the given folds, duplicates dropped and counted per fold."""
    metadata_dir = Path(metadata_dir)
    if not metadata_dir.is_dir():
        raise MetadataError(metadata_dir, None, "metadata directory not found")
    rows: list[Row] = []
    dups: dict[int, int] = {}
    files = []
    for k in folds:
        path = fold_file(metadata_dir, k)
        fold_rows, dups[k] = read_fold(path, k)
        rows.extend(fold_rows)
        files.append(path)
    return Table(rows=tuple(rows), duplicates=dups, files=tuple(files))


def metadata_digest(table: Table) -> str:
    """Content hash of the metadata files a table was read from (part of the data fingerprint)."""
    h = hashlib.sha256()
    for f in table.files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ListEntry:
    path: str
    label: int
    line: int


def read_list(path: Path) -> list[ListEntry]:
    """One Levi-Hassner list: `<user>/landmark_aligned_face.<face>.<image> <label>` per line."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(path, None, "Levi-Hassner list file not found")
    out: list[ListEntry] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise MetadataError(
                path, lineno, f"expected '<image path> <integer label>', got {line!r}"
            )
        out.append(ListEntry(parts[0], int(parts[1]), lineno))
    return out


def list_file(lists_dir: Path, fold: int, task: str, part: str) -> Path:
    return Path(lists_dir) / f"test_fold_is_{fold}" / f"{task}_{part}.txt"


def stats(table: Table, policy: AgePolicy = "strict") -> dict[str, Any]:
    """Counts per fold and in total: what `agegender data stats` prints."""
    labels = table.labels(policy)
    age, gender = labels.age, labels.gender

    def count(mask: npt.NDArray[np.bool_], duplicates: int) -> dict[str, Any]:
        a, g = age[mask], gender[mask]
        return {
            "rows": int(mask.sum()),
            "duplicates": duplicates,
            "users": len({u for u, m in zip(table.users, mask, strict=True) if m}),
            "age_labelled": int(labels.age_mask[mask].sum()),
            "gender_labelled": int(labels.gender_mask[mask].sum()),
            "both_labelled": int((labels.age_mask & labels.gender_mask)[mask].sum()),
            "age_groups": {name: int((a == i).sum()) for i, name in enumerate(AGE_GROUPS)},
            "genders": {name: int((g == i).sum()) for i, name in enumerate(GENDERS)},
        }

    folds = {
        str(k): count(table.folds == k, table.duplicates.get(k, 0))
        for k in sorted(set(table.folds.tolist()) | set(table.duplicates))
    }
    total = count(np.ones(len(table), dtype=bool), sum(table.duplicates.values()))
    return {"age_policy": policy, "folds": folds, "total": total}
