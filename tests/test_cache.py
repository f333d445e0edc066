from __future__ import annotations

import csv
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.adience import read_metadata, stats
from agegender.cache import CacheError, build_cache, decode_image, open_cache, square_resize
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


def _png(width: int, height: int, depth: int, color: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand, for what Pillow does not write: 16-bit RGB, and a header that
    declares more rows than the data holds (`rows`: each row's bytes, filter byte included)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(b"".join(rows))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _row_of(cache_dir: Path, path: Path) -> int:
    paths = open_cache(cache_dir).table.paths
    return next(i for i, p in enumerate(paths) if p.endswith(path.name))


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


def test_caffe_resize_is_bilinear_without_antialiasing() -> None:
    """cv::resize (INTER_LINEAR) from half-pixel centres: 6 -> 2 px samples source pixels 1
    and 4 exactly ((0.5 x 3) - 0.5 = 1, (1.5 x 3) - 0.5 = 4); 4 -> 2 px averages each 2 x 2
    block, rounded. The antialiased resize instead averages over each pixel's neighbours."""
    six = np.arange(36, dtype=np.uint8).reshape(6, 6, 1).repeat(3, axis=2) * 7
    np.testing.assert_array_equal(square_resize(six, 2, "caffe")[..., 0], [[49, 70], [175, 196]])
    assert square_resize(six, 2)[..., 0].tolist() != [[49, 70], [175, 196]]
    four = np.array([[10, 11, 0, 0], [12, 14, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], np.uint8)
    out = square_resize(four[:, :, None].repeat(3, axis=2), 2, "caffe")[..., 0]
    np.testing.assert_array_equal(out, [[12, 0], [0, 0]])  # 47 / 4 = 11.75; 1 / 4 = 0.25


def test_caffe_resize_is_its_own_cache(data: Path, tmp_path: Path) -> None:
    """A cache resized one way is never reused the other way: the method is in the fingerprint
    (and the manifest); the default's fingerprint is the one caches had before the option."""
    plain = build_cache(data, tmp_path / "cache", config=SMALL)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert "resize" not in manifest["settings"]
    caffe = SMALL.model_copy(update={"resize": "caffe"})
    res = build_cache(data, tmp_path / "cache", config=caffe)
    assert res.fingerprint != plain.fingerprint
    assert (res.rebuilt, res.decoded, res.reused) == (True, plain.images, 0)
    cache = open_cache(tmp_path / "cache")
    assert cache.resize == "caffe"
    path = data / "aligned" / cache.table.paths[0]
    with Image.open(path) as im:  # decoded in full (no JPEG draft), then cv::resize
        full = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(cache.image(0), square_resize(full, 32, "caffe"))
    assert not np.array_equal(cache.image(0), decode_image(path, 32))
    back = build_cache(data, tmp_path / "cache", config=SMALL)
    assert (back.fingerprint, back.decoded) == (plain.fingerprint, plain.images)
    assert open_cache(tmp_path / "cache").resize == "antialias"


def test_suite_resize_must_be_the_prepared_caches(data: Path, tmp_path: Path) -> None:
    """Without --data-root nothing rebuilds the cache: a `suite.resize` it was not built with
    is refused in one line, not trained on the other resize."""
    from agegender.config import ConfigError
    from flows.cli import _cache_has_size
    from flows.settings import SuiteRun

    build_cache(data, tmp_path / "cache", config=SMALL)
    _cache_has_size(tmp_path / "cache", SuiteRun(variants=("multitask",)))  # not given: fine
    with pytest.raises(ConfigError) as err:
        _cache_has_size(tmp_path / "cache", SuiteRun(variants=("multitask",), resize="caffe"))
    assert str(err.value) == (
        f"suite.resize=caffe, but the cache {tmp_path / 'cache'} was resized with antialias and "
        "without --data-root nothing rebuilds it: add --data-root DIR to rebuild it, or drop "
        "suite.resize"
    )


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


def test_deep_images_decode_as_their_8_bit_originals(data: Path, tmp_path: Path) -> None:
    """16-bit greys (PNG: Pillow's I;16; PGM: I) give their 8-bit originals' pixels, not white;
    16-bit RGB too; a 32-bit float image has no known scale and is reported. (Each file keeps
    its listed .jpg name: Pillow reads the content.)"""
    with Image.open(_images(data)[0]) as im:
        rgb8 = np.asarray(im.convert("RGB"))
    grey8 = np.asarray(Image.fromarray(rgb8).convert("L"))
    grey, grey16, pgm16, rgb, rgb16, floats = _images(data)[1:7]
    Image.fromarray(grey8).save(grey, format="PNG")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(grey16, format="PNG")
    height, width = grey8.shape
    pgm16.write_bytes(b"P5 %d %d 65535\n" % (width, height) + (grey8.astype(">u2") * 257).tobytes())
    Image.fromarray(rgb8).save(rgb, format="PNG")
    rows = [b"\0" + (line.astype(">u2") * 257).tobytes() for line in rgb8]
    rgb16.write_bytes(_png(width, height, 16, 2, rows))
    Image.fromarray(grey8.astype(np.float32)).save(floats, format="TIFF")

    res = build_cache(data, tmp_path / "cache", config=SMALL)
    cache = open_cache(tmp_path / "cache")
    for deep, original in ((grey16, grey), (pgm16, grey), (rgb16, rgb)):
        with Image.open(deep) as im:
            assert im.mode in ("I;16", "I;16B", "I", "RGB"), im.mode
        got = cache.image(_row_of(tmp_path / "cache", deep))
        np.testing.assert_array_equal(got, cache.image(_row_of(tmp_path / "cache", original)))
    assert cache.image(_row_of(tmp_path / "cache", grey)).mean() < 200  # a face, not white
    problems = {Path(p.path).name: p.problem for p in res.problems}
    assert problems == {
        floats.name: "not decoded: 32-bit float pixels (mode F): no known 8-bit scale; save it "
        "with 8 or 16 bits per channel"
    }


def test_an_image_over_the_pixel_limit_is_reported_before_decoding(
    data: Path, tmp_path: Path
) -> None:
    """`predict`'s limit: a 1-bit PNG whose header declares 10000 x 6000 (60 MP, 180 MB once
    RGB) is refused from its header. Its data holds 10 rows only: decoding it would fail on
    truncated data, so the limit's row shows that nothing was decoded."""
    huge = _images(data)[3]
    huge.write_bytes(_png(10_000, 6_000, 1, 0, [bytes(1 + 10_000 // 8)] * 10))
    res = build_cache(data, tmp_path / "cache", config=SMALL)
    expected = "not decoded: 10000 x 6000 = 60,000,000 pixels, over the limit of 50,000,000"
    assert {(Path(p.path).name, p.problem) for p in res.problems} == {(huge.name, expected)}
    with (tmp_path / "cache" / "report.tsv").open() as f:
        report = {(Path(r["path"]).name, r["problem"]) for r in csv.DictReader(f, delimiter="\t")}
    assert report == {(huge.name, expected)}
    assert res.images == len(_images(data)) - 1  # the rest prepared


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
