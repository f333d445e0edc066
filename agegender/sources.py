"""Larger public face sets for pretraining, read from their official layouts (CelebA, UTKFace).

Users download these themselves; this module only reads the layouts (`agegender.synth.sources`
writes synthetic copies of them). Labels are mapped onto a head per source:

CelebA (`list_attr_celeba.txt`, `list_eval_partition.txt`, `img_align_celeba/`) has no ages.
Its binary `Young` attribute becomes a two-class age head, `age_classes = ("old", "young")`:
`Young = 1` -> 1 ("young"), `Young = -1` -> 0 ("old"). Gender comes from `Male`: 1 -> 0 (male),
-1 -> 1 (female). Both are looked up by name in the header line, never by column position.
The official partition (0 train, 1 val, 2 test) is used as is.

Strictness follows `agegender.adience`: a list file that breaks its format (a count on line 1
that does not match the rows, a header without `Male` or `Young` or with a repeated name, a row
with the wrong number of values or a value other than 1/-1, a partition other than 0/1/2, a
line that is not `<file> <value>`, a file listed twice) is a fatal `MetadataError` naming the file
and the line: a shifted or mis-parsed file would label every row wrongly. Well-formed files that
disagree with each other or with the disk are reported per row in `problems` and the row is
skipped: an image listed in one list file but not the other, or listed but absent from
`img_align_celeba/`. Empty list files, and a download where every row is skipped, are errors.

UTKFace (`<age>_<gender>_<race>_<datetime>.jpg`, or `.jpg.chip.jpg` in the "aligned & cropped"
download, directly in the root or in `root/UTKFace/`) has exact ages, mapped to the 8 Adience
groups with `agegender.labels.age_group_of_years` (gaps go to the nearest group, ties to the
younger one):

    0-3 -> 0-2, 4-7 -> 4-6, 8-14 -> 8-13, 15-22 -> 15-20, 23-35 -> 25-32, 36-45 -> 38-43,
    46-56 -> 48-53, 57-120 -> 60-100

Gender 0 is male and 1 female, as in Adience's labels. A malformed name (not 4 fields, an age
that is not a whole number or is over 120, a gender other than 0/1, a race other than 0-4) is
reported in `problems` and skipped (the real download has a few names without a race field);
only a folder where no name is usable is an error. UTKFace has no partition (-1); the trainer
makes a seeded split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agegender.adience import MetadataError
from agegender.labels import AGE_GROUPS, age_group_of_years

SOURCES: tuple[str, ...] = ("celeba", "utkface")

CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_AGE_CLASSES: tuple[str, ...] = ("old", "young")
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
"""The 40 attributes in the order of the official `list_attr_celeba.txt` header."""
CELEBA_PARTITIONS = ("train", "val", "test")

UTKFACE_DIR = "UTKFace"
UTKFACE_MAX_AGE = 120
UTKFACE_SUFFIXES = (".jpg.chip.jpg", ".jpg")  # longest first
UTKFACE_RACES = 5

_VALUES = frozenset({"1", "-1"})


@dataclass(frozen=True)
class FaceRecord:
    """One labelled image of a pretraining source."""

    path: str  # relative to the source's image folder
    age: int  # label index for this source's age head; -1 = none
    gender: int  # 0 = male, 1 = female, -1 = none
    partition: int  # 0 train, 1 val, 2 test; -1 when the source has none
    source: str  # "file:line" (or the file name) for error reports


@dataclass(frozen=True)
class SourceData:
    """Everything read from one source: its records (sorted by path) and what was skipped."""

    name: str  # "celeba" | "utkface"
    image_dir: Path
    records: tuple[FaceRecord, ...]
    age_classes: tuple[str, ...]  # label i of `FaceRecord.age` is age_classes[i]
    problems: tuple[str, ...]  # skipped lines / names, each "file:line: what is wrong"

    def __len__(self) -> int:
        return len(self.records)


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise MetadataError(path, None, f"file not found (expected {what})")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MetadataError(
            path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc


@dataclass(frozen=True)
class _AttrRow:
    line: int
    male: bool
    young: bool


def _read_celeba_attributes(path: Path) -> dict[str, _AttrRow]:
    lines = _lines(path, "CelebA's attribute list")
    if not lines:
        raise MetadataError(path, 1, "empty file; expected the image count on line 1")
    count_text = lines[0].strip()
    if not (count_text.isascii() and count_text.isdigit()):
        raise MetadataError(path, 1, f"expected the image count, got {lines[0]!r}")
    if len(lines) < 2 or not lines[1].split():
        raise MetadataError(path, 2, "expected the attribute names (separated by spaces)")
    names = lines[1].split()
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MetadataError(path, 2, f"attribute names repeated: {repeated}")
    missing = [n for n in ("Male", "Young") if n not in names]
    if missing:
        raise MetadataError(
            path, 2, f"no {' or '.join(map(repr, missing))} attribute among the names {names}"
        )
    male, young = names.index("Male") + 1, names.index("Young") + 1  # +1: the file name
    rows: dict[str, _AttrRow] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != len(names) + 1:
            raise MetadataError(
                path,
                lineno,
                f"expected a file name and {len(names)} values (one per attribute on line 2), "
                f"found {len(cells) - 1} values",
            )
        if not _VALUES.issuperset(cells[1:]):
            i, bad = next((i, v) for i, v in enumerate(cells[1:]) if v not in _VALUES)
            raise MetadataError(
                path, lineno, f"attribute {names[i]!r} is {bad!r}; values must be 1 or -1"
            )
        file = cells[0]
        if file in rows:
            raise MetadataError(path, lineno, f"{file} already listed on line {rows[file].line}")
        rows[file] = _AttrRow(lineno, cells[male] == "1", cells[young] == "1")
    if int(count_text) != len(rows):
        raise MetadataError(
            path, 1, f"line 1 gives {int(count_text)} images but the file lists {len(rows)}"
        )
    if not rows:
        raise MetadataError(path, 3, "no image rows after the attribute names")
    return rows


def _read_celeba_partition(path: Path) -> dict[str, tuple[int, int]]:
    """file -> (line, partition)."""
    rows: dict[str, tuple[int, int]] = {}
    for lineno, line in enumerate(_lines(path, "CelebA's evaluation partition"), start=1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != 2:
            raise MetadataError(path, lineno, f"expected '<file> <partition>', got {line!r}")
        file, value = cells
        if value not in ("0", "1", "2"):
            raise MetadataError(
                path, lineno, f"partition must be 0 (train), 1 (val) or 2 (test), got {value!r}"
            )
        if file in rows:
            raise MetadataError(path, lineno, f"{file} already listed on line {rows[file][0]}")
        rows[file] = (lineno, int(value))
    if not rows:
        raise MetadataError(path, 1, "empty file; expected a '<file> <partition>' line per image")
    return rows


def read_celeba(root: Path | str) -> SourceData:
    """CelebA's official layout under `root`: the two list files and `img_align_celeba/`."""
    root = Path(root)
    if not root.is_dir():
        raise MetadataError(root, None, "CelebA folder not found")
    attrs = _read_celeba_attributes(root / CELEBA_ATTR_FILE)
    parts = _read_celeba_partition(root / CELEBA_PARTITION_FILE)
    image_dir = root / CELEBA_IMAGE_DIR
    if not image_dir.is_dir():
        raise MetadataError(
            image_dir, None, f"image folder not found (expected {CELEBA_IMAGE_DIR}/ in {root})"
        )
    with os.scandir(image_dir) as entries:
        on_disk = {e.name for e in entries if e.is_file()}
    records: list[FaceRecord] = []
    problems: list[str] = []
    for file, row in attrs.items():
        where = f"{CELEBA_ATTR_FILE}:{row.line}"
        if file not in parts:
            problems.append(f"{where}: {file} has no row in {CELEBA_PARTITION_FILE}; skipped")
        elif file not in on_disk:
            problems.append(f"{where}: {CELEBA_IMAGE_DIR}/{file} not found; skipped")
        else:
            records.append(
                FaceRecord(
                    path=file,
                    age=1 if row.young else 0,
                    gender=0 if row.male else 1,
                    partition=parts[file][1],
                    source=where,
                )
            )
    for file, (lineno, _) in parts.items():
        if file not in attrs:
            problems.append(
                f"{CELEBA_PARTITION_FILE}:{lineno}: {file} has no row in {CELEBA_ATTR_FILE}; "
                "skipped"
            )
    if not records:
        raise MetadataError(
            root,
            None,
            f"no usable image: all {len(attrs)} rows of {CELEBA_ATTR_FILE} were skipped "
            f"({problems[0]}, ...)",
        )
    return SourceData(
        name="celeba",
        image_dir=image_dir,
        records=tuple(sorted(records, key=lambda r: r.path)),
        age_classes=CELEBA_AGE_CLASSES,
        problems=tuple(problems),
    )


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_utkface_name(name: str) -> FaceRecord | str:
    """The record a UTKFace file name encodes, or what is wrong with the name."""
    stem = next((name[: -len(s)] for s in UTKFACE_SUFFIXES if name.lower().endswith(s)), None)
    if stem is None:
        return "not a .jpg file"
    fields = stem.split("_")
    if len(fields) != 4:
        return (
            "expected <age>_<gender>_<race>_<datetime> (4 fields separated by '_'), "
            f"found {len(fields)}"
        )
    age, gender, race, stamp = fields
    if not _is_number(age):
        return f"age {age!r} is not a whole number"
    if int(age) > UTKFACE_MAX_AGE:
        return f"age {int(age)} is over {UTKFACE_MAX_AGE}"
    if gender not in ("0", "1"):
        return f"gender must be 0 (male) or 1 (female), got {gender!r}"
    if not (_is_number(race) and int(race) < UTKFACE_RACES):
        return f"race must be 0-{UTKFACE_RACES - 1}, got {race!r}"
    if not stamp:
        return "empty datetime field"
    return FaceRecord(
        path=name,
        age=age_group_of_years(int(age)),
        gender=int(gender),
        partition=-1,
        source=name,
    )


def read_utkface(root: Path | str) -> SourceData:
    """UTKFace images named `<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]`.

    Read from `root/UTKFace/` when that folder exists (the download's archive extracts to it),
    else from `root` itself; hidden files are ignored, anything else that is not a well-formed
    name is reported and skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise MetadataError(root, None, "UTKFace folder not found")
    image_dir = root / UTKFACE_DIR if (root / UTKFACE_DIR).is_dir() else root
    with os.scandir(image_dir) as it:
        entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
    records: list[FaceRecord] = []
    problems: list[str] = []
    images = 0
    for name, is_dir in entries:
        if is_dir:
            problems.append(f"{name}/: a folder; images are read from {image_dir} only; skipped")
            continue
        parsed = parse_utkface_name(name)
        if isinstance(parsed, FaceRecord):
            records.append(parsed)
        else:
            problems.append(f"{name}: {parsed}; skipped")
        images += name.lower().endswith(".jpg")
    if not images:
        raise MetadataError(
            image_dir,
            None,
            "no .jpg images found; expected UTKFace's <age>_<gender>_<race>_<datetime>.jpg "
            f"files here or in a {UTKFACE_DIR}/ subfolder",
        )
    if not records:
        bad = next(p for p in problems if p.partition(": ")[0].lower().endswith(".jpg"))
        raise MetadataError(
            image_dir,
            None,
            f"none of the {images} .jpg names is <age>_<gender>_<race>_<datetime>.jpg "
            f"({bad.removesuffix('; skipped')}, ...)",
        )
    return SourceData(
        name="utkface",
        image_dir=image_dir,
        records=tuple(records),  # already sorted by name
        age_classes=AGE_GROUPS,
        problems=tuple(problems),
    )


_READERS: dict[str, Callable[[Path | str], SourceData]] = {
    "celeba": read_celeba,
    "utkface": read_utkface,
}


def check_name(name: str) -> None:
    """A clear error for a name that is not one of SOURCES."""
    if name not in _READERS:
        raise ValueError(f"unknown face source {name!r}; expected one of {list(SOURCES)}")


def read_source(name: str, root: Path | str) -> SourceData:
    """Read source `name` ("celeba" or "utkface") from its official layout under `root`."""
    check_name(name)
    return _READERS[name](root)
