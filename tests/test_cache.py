from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.adience import read_metadata, stats
from agegender.cache import CacheError, build_cache, decode_image, open_cache
from agegender.config import CacheConfig
from agegender.synth.adience import SynthResult
from tests.conftest import run_cli

SMALL = CacheConfig(image_size=32, workers=2)


@pytest.fixture
def data(small_synth: SynthResult, tmp_path: Path) -> Path:
    """A private copy of the small synthetic download, free to damage."""
    return Path(shutil.copytree(small_synth.out, tmp_path / "adience"))


def _images(root: Path) -> list[Path]:
    return sorted((root / "aligned").rglob("*.jpg"))


def test_build_then_rebuild_decodes_nothing(data: Path, tmp_path: Path) -> None:
    first = build_cache(data, tmp_path / "cache", config=SMALL)
    n = len(_images(data))
    assert (first.images, first.decoded, first.reused, first.problems) == (n, n, 0, ())
    cache = open_cache(tmp_path / "cache")
    assert cache.images.dtype == np.uint8
    assert cache.images.shape == (n, 32, 32, 3)
    # Every metadata row with an image is indexed, labels included.
    assert stats(cache.table) == stats(read_metadata(data))
    for i in (0, 9, len(cache.table) - 1):
        expected = decode_image(data / "aligned" / cache.table.paths[i], 32)
        np.testing.assert_array_equal(cache.image(i), expected)
        # the fast path is a faithful resize: close to PIL's full-scale antialiased resize
        with Image.open(data / "aligned" / cache.table.paths[i]) as im:
            naive = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
        assert np.abs(cache.image(i).astype(int) - naive).mean() < 4

    second = build_cache(data, tmp_path / "cache", config=SMALL)
    assert (second.decoded, second.rebuilt, second.fingerprint) == (0, False, first.fingerprint)


def test_bad_images_are_reported_and_the_rest_cached(data: Path, tmp_path: Path) -> None:
    corrupt, truncated, missing = _images(data)[:3]
    corrupt.write_bytes(b"this is not a JPEG file" * 20)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    missing.unlink()
    res = build_cache(data, tmp_path / "cache", config=SMALL)

    problems = {Path(p.path).name: p.problem for p in res.problems}
    assert set(problems) == {corrupt.name, truncated.name, missing.name}
    assert problems[missing.name] == "missing file"
    assert problems[corrupt.name].startswith("cannot decode: UnidentifiedImageError")
    assert "truncated" in problems[truncated.name]
    assert res.images == len(_images(data)) - 2  # the missing one is already gone from disk
    with (tmp_path / "cache" / "report.tsv").open() as f:
        report = list(csv.DictReader(f, delimiter="\t"))
    assert {Path(r["path"]).name for r in report} == set(problems)
    assert all(r["metadata"].startswith("fold_") for r in report)  # points at the metadata line

    cache = open_cache(tmp_path / "cache")
    bad = {corrupt.name, truncated.name, missing.name}
    kept = [p for p in read_metadata(data).paths if Path(p).name not in bad]
    assert list(cache.table.paths) == kept
    assert cache.images[cache.slots].any(axis=(1, 2, 3)).all()  # every indexed image was written


def test_changed_dataset_redecodes_only_what_changed(data: Path, tmp_path: Path) -> None:
    build_cache(data, tmp_path / "cache", config=SMALL)
    changed = _images(data)[5]
    Image.new("RGB", (64, 64), (250, 10, 10)).save(changed)
    res = build_cache(data, tmp_path / "cache", config=SMALL)
    assert (res.decoded, res.reused, res.rebuilt) == (1, len(_images(data)) - 1, True)
    cache = open_cache(tmp_path / "cache")
    row = next(i for i, p in enumerate(cache.table.paths) if p.endswith(changed.name))
    assert np.abs(cache.image(row)[16, 16].astype(int) - (250, 10, 10)).max() <= 3  # JPEG

    other = build_cache(data, tmp_path / "cache", config=CacheConfig(image_size=24, workers=1))
    assert (other.decoded, other.reused) == (len(_images(data)), 0)  # new settings: all again
    assert open_cache(tmp_path / "cache").images.shape[1:] == (24, 24, 3)


def test_clear_errors_for_wrong_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no 'aligned/' folder"):
        build_cache(tmp_path, tmp_path / "cache")
    with pytest.raises(CacheError, match="run `agegender prepare`"):
        open_cache(tmp_path / "nothing")


@pytest.mark.integration
def test_prepare_cli(data: Path, tmp_path: Path) -> None:
    _images(data)[0].write_bytes(b"\xff\xd8\xff broken")
    cmd = (
        "prepare",
        "--data-root",
        data,
        "--cache",
        tmp_path / "c",
        "--image-size",
        "32",
        "--json",
    )
    res = run_cli(*cmd)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["skipped"], out["decoded"], out["images"]) == (1, out["images"], out["images"])
    again = json.loads(run_cli(*cmd).stdout)
    assert (again["decoded"], again["skipped"]) == (0, 1)


@pytest.mark.integration
def test_cli_errors_name_file_and_line(data: Path, tmp_path: Path) -> None:
    fold = data / "fold_2_data.txt"
    lines = fold.read_text().splitlines()
    lines[6] = lines[6].replace("\t", " ", 1)
    fold.write_text("\n".join(lines) + "\n")
    res = run_cli("prepare", "--data-root", data, "--cache", tmp_path / "c")
    assert res.returncode == 2
    assert "fold_2_data.txt, line 7: expected 12 tab-separated columns, found 11" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "c").exists()  # nothing half-built
