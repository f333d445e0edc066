from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from agegender.adience import read_metadata, stats
from agegender.synthetic import SynthResult, write_synthetic
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
