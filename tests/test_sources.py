from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender import sources
from agegender.adience import MetadataError
from agegender.labels import AGE_GROUPS, age_group_of_years
from agegender.sources import (
    CELEBA_ATTR_FILE,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGE_DIR,
    CELEBA_PARTITION_FILE,
    SourceData,
    read_celeba,
    read_source,
    read_utkface,
)
from agegender.synth.sources import plan_synthetic_source, write_synthetic_source
from tests.conftest import run_cli

N, SIZE, SEED = 40, 32, 5


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SourceData]:
    root = tmp_path_factory.mktemp("celeba")
    return root, write_synthetic_source("celeba", root, n=N, size=SIZE, seed=SEED, workers=1)


@pytest.fixture(scope="module")
def utkface(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SourceData]:
    root = tmp_path_factory.mktemp("utkface")
    return root, write_synthetic_source("utkface", root, n=N, size=SIZE, seed=SEED, workers=1)


@pytest.fixture
def celeba_copy(celeba: tuple[Path, SourceData], tmp_path: Path) -> Path:
    """A private copy of the synthetic CelebA download, free to break."""
    return Path(shutil.copytree(celeba[0], tmp_path / "celeba"))


def _edit(path: Path, fn: Callable[[list[str]], object]) -> None:
    lines = path.read_text().splitlines()
    fn(lines)
    path.write_text("\n".join(lines) + "\n")


def test_synthetic_celeba_reads_back_what_was_drawn(celeba: tuple[Path, SourceData]) -> None:
    root, data = celeba
    drawn = plan_synthetic_source("celeba", N, SEED)
    assert (data.name, data.image_dir, data.problems) == ("celeba", root / CELEBA_IMAGE_DIR, ())
    assert data.age_classes == ("old", "young")
    assert [r.path for r in data.records] == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    for rec, face in zip(data.records, drawn, strict=True):
        assert rec.path == face.file
        assert rec.gender == face.gender
        assert data.age_classes[rec.age] == ("young" if face.age_years < 35 else "old")
        assert rec.partition == face.partition
    assert Counter(r.partition for r in data.records) == {0: 32, 1: 4, 2: 4}
    assert len({f.identity for f in drawn}) < N  # some identities have several photos
    assert {r.gender for r in data.records} == {0, 1}
    assert {r.age for r in data.records} == {0, 1}
    lines = (root / CELEBA_ATTR_FILE).read_text().splitlines()
    assert lines[0] == str(N)
    assert tuple(lines[1].split()) == CELEBA_ATTRIBUTES
    assert len(CELEBA_ATTRIBUTES) == 40
    assert sorted(p.name for p in data.image_dir.iterdir()) == [r.path for r in data.records]
    with Image.open(data.image_dir / data.records[0].path) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (SIZE, round(SIZE * 218 / 178)), "RGB")
    assert read_source("celeba", root) == data


def test_synthetic_utkface_reads_back_what_was_drawn(utkface: tuple[Path, SourceData]) -> None:
    root, data = utkface
    drawn = {f.file: f for f in plan_synthetic_source("utkface", N, SEED)}
    assert (data.name, data.image_dir, data.problems) == ("utkface", root / "UTKFace", ())
    assert data.age_classes == AGE_GROUPS
    assert len(data.records) == N
    assert [r.path for r in data.records] == sorted(drawn)
    for rec in data.records:
        face = drawn[rec.path]
        assert rec.path.endswith(".jpg.chip.jpg")
        assert rec.age == age_group_of_years(face.age_years)
        assert (rec.gender, rec.partition) == (face.gender, -1)
        assert 0 <= face.age_years <= 80
    assert len({f.identity for f in drawn.values()}) < N
    with Image.open(data.image_dir / data.records[0].path) as im:
        assert (im.format, im.size) == ("JPEG", (SIZE, SIZE))
    assert read_utkface(root / "UTKFace") == data  # the folder itself reads the same


def test_plans_are_seeded() -> None:
    for fmt in sources.SOURCES:
        assert plan_synthetic_source(fmt, 30, 1) == plan_synthetic_source(fmt, 30, 1)
        assert plan_synthetic_source(fmt, 30, 1) != plan_synthetic_source(fmt, 30, 2)


def test_celeba_attributes_are_read_by_name(
    celeba: tuple[Path, SourceData], celeba_copy: Path
) -> None:
    perm = np.random.default_rng(0).permutation(40).tolist()
    assert perm[20] != 20  # `Male` moves
    assert perm[39] != 39  # `Young` moves

    def shuffle(lines: list[str]) -> None:
        names = lines[1].split()
        lines[1] = " ".join(names[i] for i in perm)
        for k in range(2, len(lines)):
            cells = lines[k].split()
            lines[k] = " ".join([cells[0], *(cells[1:][i] for i in perm)])

    _edit(celeba_copy / CELEBA_ATTR_FILE, shuffle)
    assert (celeba_copy / CELEBA_ATTR_FILE).read_text() != (
        celeba[0] / CELEBA_ATTR_FILE
    ).read_text()
    again = read_celeba(celeba_copy)
    assert again.records == celeba[1].records
    assert again.problems == ()


def _set(k: int, text: str) -> Callable[[list[str]], None]:
    def fn(lines: list[str]) -> None:
        lines[k - 1] = text

    return fn


def _drop_last_value(k: int) -> Callable[[list[str]], None]:
    def fn(lines: list[str]) -> None:
        lines[k - 1] = lines[k - 1].rsplit(" ", 1)[0]

    return fn


def _value(k: int, column: int, value: str) -> Callable[[list[str]], None]:
    def fn(lines: list[str]) -> None:
        cells = lines[k - 1].split()
        cells[column + 1] = value
        lines[k - 1] = " ".join(cells)

    return fn


def _rename(old: str, new: str) -> Callable[[list[str]], None]:
    def fn(lines: list[str]) -> None:
        lines[1] = " ".join(new if n == old else n for n in lines[1].split())

    return fn


def _append(text: str) -> Callable[[list[str]], None]:
    return lambda lines: lines.append(text)


@pytest.mark.parametrize(
    ("file", "edit", "line", "message"),
    [
        (CELEBA_ATTR_FILE, _set(1, "41"), 1, "line 1 gives 41 images but the file lists 40"),
        (CELEBA_ATTR_FILE, _set(1, "many"), 1, "expected the image count"),
        (CELEBA_ATTR_FILE, _drop_last_value(7), 7, "expected a file name and 40 values"),
        (CELEBA_ATTR_FILE, _value(9, 3, "2"), 9, "'Bags_Under_Eyes' is '2'"),
        (CELEBA_ATTR_FILE, _rename("Male", "Mal"), 2, "no 'Male' attribute"),
        (CELEBA_ATTR_FILE, _rename("Young", "Male"), 2, "repeated: ['Male']"),
        (CELEBA_ATTR_FILE, _set(5, "000001.jpg" + " -1" * 40), 5, "already listed on line 3"),
        (CELEBA_PARTITION_FILE, _set(4, "000004.jpg 5"), 4, "got '5'"),
        (CELEBA_PARTITION_FILE, _set(6, "000006.jpg 0 1"), 6, "expected '<file> <partition>'"),
        (CELEBA_PARTITION_FILE, _append("000002.jpg 1"), N + 1, "already listed on line 2"),
    ],
)
def test_malformed_celeba_files_are_fatal(
    celeba_copy: Path,
    file: str,
    edit: Callable[[list[str]], None],
    line: int,
    message: str,
) -> None:
    _edit(celeba_copy / file, edit)
    with pytest.raises(MetadataError) as err:
        read_celeba(celeba_copy)
    assert (err.value.path, err.value.line) == (str(celeba_copy / file), line)
    assert str(err.value).startswith(f"{celeba_copy / file}, line {line}: ")
    assert message in str(err.value)


def test_celeba_rows_that_do_not_join_are_reported_and_skipped(
    celeba: tuple[Path, SourceData], celeba_copy: Path
) -> None:
    _edit(celeba_copy / CELEBA_PARTITION_FILE, lambda lines: lines.pop(4))  # 000005.jpg
    _edit(celeba_copy / CELEBA_PARTITION_FILE, _append("999999.jpg 2"))
    (celeba_copy / CELEBA_IMAGE_DIR / "000007.jpg").unlink()
    data = read_celeba(celeba_copy)
    assert data.problems == (
        f"{CELEBA_ATTR_FILE}:7: 000005.jpg has no row in {CELEBA_PARTITION_FILE}; skipped",
        f"{CELEBA_ATTR_FILE}:9: {CELEBA_IMAGE_DIR}/000007.jpg not found; skipped",
        f"{CELEBA_PARTITION_FILE}:40: 999999.jpg has no row in {CELEBA_ATTR_FILE}; skipped",
    )
    kept = [r for r in celeba[1].records if r.path not in ("000005.jpg", "000007.jpg")]
    assert data.records == tuple(kept)


@pytest.mark.parametrize("missing", [CELEBA_ATTR_FILE, CELEBA_PARTITION_FILE, CELEBA_IMAGE_DIR])
def test_missing_celeba_parts_are_fatal(celeba_copy: Path, missing: str) -> None:
    path = celeba_copy / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(MetadataError, match="not found") as err:
        read_celeba(celeba_copy)
    assert err.value.path == str(path)


GOOD = {
    "2_0_0_20170109150557335.jpg.chip.jpg": ("0-2", 0),
    "3_1_2_x.jpg": ("0-2", 1),  # a gap: age_group_of_years puts 3 in the younger group
    "35_0_4_x.jpg.chip.jpg": ("25-32", 0),
    "36_1_1_x.jpg": ("38-43", 1),
    "90_1_3_x.jpg": ("60-100", 1),
    "116_0_0_x.jpg": ("60-100", 0),
}
BAD = {
    "abc_0_0_x.jpg": "age 'abc' is not a whole number",
    "30_2_0_x.jpg": "gender must be 0 (male) or 1 (female), got '2'",
    "300_0_0_x.jpg": "age 300 is over 120",
    "12.jpg": "(4 fields separated by '_'), found 1",
    "39_1_20170116174525125.jpg.chip.jpg": "found 3",  # as in the real download: no race
    "30_0_7_x.jpg": "race must be 0-4, got '7'",
    "30_0_0_x_y.jpg": "found 5",
    "-3_0_0_x.jpg": "age '-3' is not a whole number",
    "notes.txt": "not a .jpg file",
}


def test_utkface_bad_names_are_reported_and_skipped(tmp_path: Path) -> None:
    for name in [*GOOD, *BAD, ".DS_Store"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "part1").mkdir()
    data = read_source("utkface", tmp_path)  # images directly in the root
    assert data.image_dir == tmp_path
    assert [r.path for r in data.records] == sorted(GOOD)
    for rec in data.records:
        group, gender = GOOD[rec.path]
        assert (AGE_GROUPS[rec.age], rec.gender, rec.partition) == (group, gender, -1)
        assert rec.source == rec.path
    assert len(data.problems) == len(BAD) + 1
    for name, what in BAD.items():
        [problem] = [p for p in data.problems if p.startswith(f"{name}: ")]
        assert what in problem
        assert problem.endswith("; skipped")
    assert any(p.startswith("part1/: a folder") for p in data.problems)


def test_utkface_age_table_in_the_docstring_is_computed() -> None:
    runs: list[tuple[int, int, int]] = []
    for age in range(121):
        g = age_group_of_years(age)
        if runs and runs[-1][2] == g:
            runs[-1] = (runs[-1][0], age, g)
        else:
            runs.append((age, age, g))
    table = ", ".join(f"{lo}-{hi} -> {AGE_GROUPS[g]}" for lo, hi, g in runs)
    assert table in " ".join((sources.__doc__ or "").split())
    assert [age_group_of_years(a) for a in (2, 3, 35, 90)] == [0, 0, 4, 7]


def test_empty_or_missing_utkface_folder_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"no \.jpg images found"):
        read_utkface(tmp_path)
    (tmp_path / "UTKFace.tar.gz").write_bytes(b"")
    with pytest.raises(MetadataError, match=r"no \.jpg images found") as err:
        read_utkface(tmp_path)  # only the archive: not extracted yet
    assert err.value.path == str(tmp_path)
    with pytest.raises(MetadataError, match="UTKFace folder not found"):
        read_utkface(tmp_path / "nope")


def test_unknown_source_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown face source 'imdb'.*'celeba', 'utkface'"):
        read_source("imdb", tmp_path)
    with pytest.raises(ValueError, match="unknown face source 'CelebA'"):
        write_synthetic_source("CelebA", tmp_path)
    assert not any(tmp_path.iterdir())


def test_writer_reruns_but_never_mixes_draws(tmp_path: Path) -> None:
    first = write_synthetic_source("utkface", tmp_path, n=3, size=16, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")}
    assert write_synthetic_source("utkface", tmp_path, n=3, size=16, workers=1) == first
    # untouched: the cache's fingerprint (sizes and mtimes), and the runs keyed on it, stay valid
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")} == stamps
    with pytest.raises(FileExistsError, match="write to an empty folder"):
        write_synthetic_source("utkface", tmp_path, n=3, size=16, seed=1, workers=1)


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["celeba", "utkface"])
def test_synth_cli_writes_the_official_layout(fmt: str, tmp_path: Path) -> None:
    res = run_cli(
        "synth",
        "--format",
        fmt,
        "--out",
        tmp_path / fmt,
        "--count",
        "12",
        "--size",
        "24",
        "--workers",
        "1",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] == 12
    data = read_source(fmt, tmp_path / fmt)
    assert (len(data), data.problems) == (12, ())
