from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.adience import read_metadata, stats
from agegender.synth.adience import SynthResult, write_synthetic
from agegender.synth.photos import group_photo
from tests.conftest import run_cli


def test_random_structure_reads_back_with_every_class_in_every_fold(
    small_synth: SynthResult,
) -> None:
    table = read_metadata(small_synth.out)  # the real reader, unchanged
    s = stats(table)
    for k in range(5):
        fold = s["folds"][str(k)]
        assert fold["rows"] == 24
        assert fold["duplicates"] == 1
        assert all(n > 0 for n in fold["age_groups"].values()), fold
        assert all(n > 0 for n in fold["genders"].values()), fold
    users = [{u for u, f in zip(table.users, table.folds, strict=True) if f == k} for k in range(5)]
    assert sum(len(u) for u in users) == len(set().union(*users))  # folds are user-disjoint
    paths = sorted(
        p.relative_to(small_synth.out / "aligned").as_posix()
        for p in (small_synth.out / "aligned").rglob("*.jpg")
    )
    assert paths == sorted(set(table.paths))
    with Image.open(small_synth.out / "aligned" / paths[0]) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (64, 64), "RGB")


def test_seeded_and_resumable(small_synth: SynthResult, tmp_path: Path) -> None:
    again = write_synthetic(tmp_path / "a", size=64, per_fold=24, seed=3, workers=1)
    images = sorted((again.out / "aligned").rglob("*.jpg"))[:5]
    for rel in [Path("fold_3_data.txt"), *(p.relative_to(again.out) for p in images)]:
        assert (again.out / rel).read_bytes() == (small_synth.out / rel).read_bytes(), rel
    other = write_synthetic(tmp_path / "b", size=64, per_fold=24, seed=4, workers=1)
    assert (other.out / "fold_0_data.txt").read_text() != (
        again.out / "fold_0_data.txt"
    ).read_text()

    rerun = write_synthetic(tmp_path / "a", size=64, per_fold=24, seed=3, workers=1)
    assert (rerun.rewritten, rerun.images) == (0, again.images)  # same settings: kept
    bigger = write_synthetic(tmp_path / "a", size=80, per_fold=24, seed=3, workers=1)
    assert bigger.rewritten == again.images  # other settings: every image redrawn


def test_too_few_rows_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_fold must be >= 8"):
        write_synthetic(tmp_path, per_fold=5)


@pytest.mark.integration
def test_like_metadata_gives_the_real_stats(real_metadata: Path, tmp_path: Path) -> None:
    out = tmp_path / "like"
    res = run_cli("synth", "--out", out, "--like-metadata", real_metadata, "--size", "16", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 19487  # every row, duplicates included
    for policy in ("strict", "lenient"):
        ours, real = (
            run_cli("data", "stats", "--metadata", m, "--age-policy", policy, "--json")
            for m in (out, real_metadata)
        )
        assert ours.returncode == real.returncode == 0, ours.stderr + real.stderr
        assert json.loads(ours.stdout) == json.loads(real.stdout)
    assert len(list((out / "aligned").rglob("*.jpg"))) == 19370  # one image per distinct path


def test_group_photo_places_faces_left_to_right_without_overlap() -> None:
    photo, where = group_photo(3, 900, 400, seed=4)
    assert (photo.size, photo.mode) == ((900, 400), "RGB")
    assert len(where) == 3
    for (x, y, w, h), nxt in zip(where, [*where[1:], None], strict=True):
        assert w == h == 240  # default: 80 % of a 300 px slot, under 60 % of the height
        assert 0 <= x < x + w <= 900
        assert 0 <= y < y + h <= 400
        assert abs(y + h / 2 - 200) <= 0.1 * (400 - h) + 1  # centred, jitter 10 % of the margin
        if nxt is not None:
            assert x + w <= nxt[0]
    # The pasted crop is exactly a rendered face, not blended into the background.
    x, y, w, h = where[0]
    crop = np.asarray(photo)[y : y + h, x : x + w]
    assert crop.std() > 20
    again, where2 = group_photo(3, 900, 400, seed=4)
    assert where2 == where
    assert again.tobytes() == photo.tobytes()
    assert group_photo(3, 900, 400, seed=5)[1] != where


def test_group_photo_without_faces_and_bad_sizes() -> None:
    photo, where = group_photo(0, 320, 240, seed=1)
    assert where == []
    arr = np.asarray(photo).astype(np.float64)
    assert arr.shape == (240, 320, 3)
    assert arr.std() > 3  # gradient + noise, not a flat fill
    assert group_photo(2, 400, 300, face_size=100)[1][0][2:] == (100, 100)
    with pytest.raises(ValueError, match=r"face_size 250 must be in 8\.\.200"):
        group_photo(2, 400, 300, face_size=250)
    with pytest.raises(ValueError, match="n_faces must be >= 0"):
        group_photo(-1, 400, 300)
