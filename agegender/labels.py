"""Adience label vocabulary: the 8 age groups, the age-string policies and gender.

The metadata's `age` column is a free string. The published protocol (Levi & Hassner) keeps only
the eight exact group strings; the TensorFlow seed looked for `(8, 13)`, which never occurs (the
files spell that group `(8, 12)`), and silently lost a whole class. Both spellings map here.

Policy `lenient` also recovers rows whose string is an obvious variant or a single age. Its table
(every other string stays unlabelled, including the ambiguous `3`, `35`, `(38, 48)`, `(8, 23)`
and `None`):

| string                    | group  |
|---------------------------|--------|
| `(25, 23)`, `(27, 32)`    | 25-32  |
| `(38, 42)`                | 38-43  |
| `2`                       | 0-2    |
| `13`                      | 8-13   |
| `22`                      | 15-20  |
| `23`, `29`, `32`, `34`    | 25-32  |
| `36`, `42`, `45`          | 38-43  |
| `46`, `55`, `56`          | 48-53  |
| `57`, `58`                | 60-100 |
"""

from __future__ import annotations

from typing import Literal

AgePolicy = Literal["strict", "lenient"]

AGE_GROUPS: tuple[str, ...] = ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60-100")
"""Display names, in label order (label i is AGE_GROUPS[i])."""

AGE_RANGES: tuple[tuple[int, int], ...] = (
    (0, 2),
    (4, 6),
    (8, 13),
    (15, 20),
    (25, 32),
    (38, 43),
    (48, 53),
    (60, 100),
)

GENDERS: tuple[str, ...] = ("m", "f")
"""Label 0 is male, 1 is female: the order of the Levi-Hassner lists."""

NO_LABEL = -1

_STRICT: dict[str, int] = {
    "(0, 2)": 0,
    "(4, 6)": 1,
    "(8, 12)": 2,  # how the metadata spells 8-13
    "(8, 13)": 2,
    "(15, 20)": 3,
    "(25, 32)": 4,
    "(38, 43)": 5,
    "(48, 53)": 6,
    "(60, 100)": 7,
}

LENIENT_EXTRA: dict[str, int] = {
    "(25, 23)": 4,
    "(27, 32)": 4,
    "(38, 42)": 5,
    "2": 0,
    "13": 2,
    "22": 3,
    "23": 4,
    "29": 4,
    "32": 4,
    "34": 4,
    "36": 5,
    "42": 5,
    "45": 5,
    "46": 6,
    "55": 6,
    "56": 6,
    "57": 7,
    "58": 7,
}

_TABLES: dict[str, dict[str, int]] = {
    "strict": _STRICT,
    "lenient": {**_STRICT, **LENIENT_EXTRA},
}

LEVI_HASSNER_AGE_STRINGS: tuple[str, ...] = (
    "(0, 2)",
    "(4, 6)",
    "(8, 12)",
    "(15, 20)",
    "(25, 32)",
    "(38, 43)",
    "(48, 53)",
    "(60, 100)",
)
"""The list files' label index is the position of the metadata string in this tuple."""


def age_label(age: str, policy: AgePolicy = "strict") -> int:
    """Age-group index for a metadata age string, or NO_LABEL."""
    try:
        table = _TABLES[policy]
    except KeyError:
        raise ValueError(
            f"unknown age policy {policy!r}; expected one of {sorted(_TABLES)}"
        ) from None
    return table.get(age.strip(), NO_LABEL)


def gender_label(gender: str) -> int:
    """0 for `m`, 1 for `f`, NO_LABEL for `u`, empty or anything else."""
    return {"m": 0, "f": 1}.get(gender.strip(), NO_LABEL)


def age_group_of_years(years: float) -> int:
    """The group that contains an exact age, or the nearest one (gaps such as 3 or 35 included)."""

    def distance(rng: tuple[int, int]) -> float:
        lo, hi = rng
        return 0.0 if lo <= years <= hi else min(abs(years - lo), abs(years - hi))

    return min(range(len(AGE_RANGES)), key=lambda i: (distance(AGE_RANGES[i]), i))
