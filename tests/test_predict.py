"""Prediction on photos: the training preprocessing exactly, and bad files reported per file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender.cache import open_cache
from agegender.config import load_config
from agegender.detect import FaceDetector
from agegender.evaluate import predict
from agegender.labels import AGE_GROUPS
from agegender.predict import Predictor, collect_paths, predict_paths, prepare_bytes
from agegender.train import prepare_run, train_fold
from tests.conftest import run_cli

SMALL = [
    "data.crop=48",
    "optim.name=adam",
    "optim.weight_decay=0",
    "model.norm=batchnorm",
    "train.patience=null",
    "train.iterations=3",
    "train.tencrop=false",
]


@pytest.fixture(scope="module")
def trained(learn_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict-model")
    return train_fold(learn_cache, 0, load_config(None, SMALL), out / "run").out_dir / "best.pt"


def test_photos_get_the_same_answer_as_the_evaluation(learn_cache: Path, trained: Path) -> None:
    cache = open_cache(learn_cache)
    run = prepare_run(cache, 0, load_config(None, SMALL))
    part = run.data.test
    predictor = Predictor.load(trained, "cpu")
    run.model.load_state_dict(predictor.model.state_dict())
    expected = predict(run.model, run.data.store, part, 48, run.data.normalize, 64, tencrop=True)
    aligned = learn_cache.parent / "adience" / "aligned"
    paths = [str(aligned / cache.table.rows[r].path) for r in part.rows[:40]]
    assert predictor.image_size == cache.image_size == 56
    rows = list(predict_paths(predictor, paths, batch_size=16))
    ten = list(predict_paths(predictor, paths, oversample=True, batch_size=16))
    for i, (row, row10) in enumerate(zip(rows, ten, strict=True)):
        assert row["error"] is None
        for head in ("age", "gender"):
            probs = np.array(list(row[f"{head}_probs"].values()))
            np.testing.assert_allclose(probs, expected.center[head][i], atol=1e-4)
            probs10 = np.array(list(row10[f"{head}_probs"].values()))
            assert expected.tencrop is not None
            np.testing.assert_allclose(probs10, expected.tencrop[head][i], atol=1e-4)
            assert row[head] == predictor.labels[head][int(expected.center[head][i].argmax())]


def test_bad_files_get_a_row_and_the_batch_goes_on(
    learn_cache: Path, trained: Path, tmp_path: Path
) -> None:
    aligned = learn_cache.parent / "adience" / "aligned"
    good = sorted(aligned.rglob("*.jpg"))[:3]
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, g in enumerate(good):
        shutil.copy(g, photos / ("sub" if i == 2 else "") / f"good{i}.jpg")
    (photos / "corrupt.jpg").write_bytes(good[0].read_bytes()[:300])
    (photos / "notes.jpg").write_text("not an image at all")
    Image.new("RGB", (9000, 6000)).save(photos / "huge.png")  # 54 MP: over the limit
    (photos / "README.md").write_text("ignored: not an image suffix")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{photos / 'good0.jpg'}\n{tmp_path / 'missing.jpg'}\n")
    assert len(collect_paths([photos])) == 6

    out = tmp_path / "rows.jsonl"
    res = run_cli(
        "predict", photos, listing, "--model", trained.parent, "--out", out, "--no-detect"
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8
    by_name = {Path(r["path"]).name: r for r in rows}
    errors = {name: r["error"] for name, r in by_name.items() if r["error"]}
    assert set(errors) == {"corrupt.jpg", "notes.jpg", "huge.png", "missing.jpg"}
    assert errors["corrupt.jpg"].startswith(("cannot decode", "not an image PIL can read"))
    assert "Truncated" in errors["corrupt.jpg"]
    assert "not an image" in errors["notes.jpg"]
    assert "54,000,000 pixels, over the limit" in errors["huge.png"]
    assert errors["missing.jpg"] == "file not found"
    for name in ("good0.jpg", "good1.jpg", "good2.jpg"):
        row = by_name[name]
        assert row["age"] in row["age_probs"]
        assert row["gender"] in ("m", "f")
        assert sum(row["age_probs"].values()) == pytest.approx(1, abs=1e-3)
    assert "8 photo(s): 4 face(s) predicted (whole images), 4 could not be used" in res.stderr

    csv_out = tmp_path / "rows.csv"
    res = run_cli(
        "predict", photos / "sub", "--model", trained, "--format", "csv", "--out", csv_out,
        "--no-detect",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    header, line = csv_out.read_text().splitlines()
    assert header.startswith("path,face,box,status,error,age,age_prob,age_prob_0-2,")
    assert line.startswith(f"{photos / 'sub' / 'good2.jpg'},0,,whole image,,")
    bad = run_cli("predict", photos, "--model", tmp_path / "nothing.pt")
    assert bad.returncode == 2
    assert "--model" in bad.stderr
    assert "no such checkpoint" in bad.stderr


def test_a_16_bit_grey_photo_predicts_as_its_8_bit_original(
    learn_cache: Path, trained: Path, tmp_path: Path
) -> None:
    """A face saved as a 16-bit grey PNG (x257) gets its 8-bit original's answer, not a white
    image's, through the training decode (`--no-detect`) and the served model's (bytes)."""
    face = sorted((learn_cache.parent / "adience" / "aligned").rglob("*.jpg"))[0]
    with Image.open(face) as im:
        grey = np.asarray(im.convert("L"))
    paths = {"grey8": tmp_path / "grey8.png", "grey16": tmp_path / "grey16.png"}
    paths["white"] = tmp_path / "white.png"
    Image.fromarray(grey).save(paths["grey8"])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["grey16"])
    Image.fromarray(np.full_like(grey, 255)).save(paths["white"])
    predictor = Predictor.load(trained, "cpu")
    rows = list(predict_paths(predictor, [str(p) for p in paths.values()]))
    probs = {
        name: np.array(list(r["age_probs"].values())) for name, r in zip(paths, rows, strict=True)
    }
    assert [r["error"] for r in rows] == [None] * 3
    np.testing.assert_allclose(probs["grey16"], probs["grey8"], atol=1e-6)
    assert np.abs(probs["grey16"] - probs["white"]).max() > 1e-4

    size = predictor.image_size
    served = {n: prepare_bytes(n, paths[n].read_bytes(), size, None) for n in ("grey8", "grey16")}
    np.testing.assert_array_equal(served["grey16"].faces[0][1], served["grey8"].faces[0][1])
    floats = tmp_path / "float.tif"
    Image.fromarray(grey.astype(np.float32)).save(floats)
    refused = prepare_bytes("float", floats.read_bytes(), size, None)
    assert (refused.status, refused.faces) == ("error", [])
    assert str(refused.error).startswith("32-bit float pixels (mode F)")


def test_every_face_gets_a_row_and_a_photo_without_one_says_so(
    trained: Path, photos: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "rows.jsonl"
    res = run_cli("predict", photos["dir"], "--model", trained, "--out", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(Path(row["path"]).name, []).append(row)
    assert sorted(by_name) == ["corrupt.jpg", "none.png", "two.jpg"]
    two = by_name["two.jpg"]
    assert [r["face"] for r in two] == [0, 1]  # left to right
    for row, (x, y, w, h) in zip(two, photos["faces"], strict=True):
        bx, by, bw, bh = row["box"]
        assert x <= bx + bw / 2 <= x + w
        assert y <= by + bh / 2 <= y + h
        assert 0.3 * w < bw < w  # the cascade's box: brows to mouth, inside the aligned crop
        assert (row["status"], row["error"]) == ("face", None)
        assert row["age"] in AGE_GROUPS
        assert row["gender"] in ("m", "f")
        assert row["age_prob"] == max(row["age_probs"].values())
        assert sum(row["age_probs"].values()) == pytest.approx(1, abs=1e-3)
    (none,) = by_name["none.png"]
    assert (none["status"], none["face"], none["box"], none["error"]) == (
        "no face",
        None,
        None,
        None,
    )
    assert "age" not in none
    (corrupt,) = by_name["corrupt.jpg"]
    assert corrupt["status"] == "error"
    assert "truncated" in corrupt["error"].lower()
    assert "3 photo(s): 2 face(s) predicted, 1 photo(s) without a face, 1 could not be used" in (
        res.stderr
    )

    csv_out = tmp_path / "rows.csv"
    res = run_cli(
        "predict", photos["dir"] / "two.jpg", "--model", trained, "--oversample",
        "--format", "csv", "--out", csv_out,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    header, *lines = csv_out.read_text().splitlines()
    assert header.startswith("path,face,box,status,error,age,age_prob,age_prob_0-2,")
    assert [line.split(",")[1:4] for line in lines] == [
        ["0", " ".join(map(str, two[0]["box"])), "face"],
        ["1", " ".join(map(str, two[1]["box"])), "face"],
    ]


def test_batches_do_not_change_the_answers(trained: Path, photos: dict[str, Any]) -> None:
    """Faces of several photos share a batch: the rows must not depend on how they are cut."""
    predictor = Predictor.load(trained, "cpu")
    detector = FaceDetector()
    paths = [str(photos["dir"] / n) for n in ("two.jpg", "none.png", "two.jpg", "corrupt.jpg")]
    one = list(predict_paths(predictor, paths, batch_size=1, detector=detector))
    big = list(predict_paths(predictor, paths, batch_size=64, detector=detector))
    assert [(r["path"], r["face"]) for r in one] == [(r["path"], r["face"]) for r in big]
    assert len(one) == 6
    for a, b in zip(one, big, strict=True):
        if a["status"] == "face":
            for head in ("age", "gender"):
                np.testing.assert_allclose(
                    list(a[f"{head}_probs"].values()), list(b[f"{head}_probs"].values()), atol=2e-4
                )
    assert one[0]["age_probs"] == one[3]["age_probs"]  # the same photo twice, the same answer


def test_synth_writes_photos_with_where_the_faces_are(tmp_path: Path) -> None:
    res = run_cli("synth", "--format", "photos", "--out", tmp_path, "--count", "5", "--size", "320")
    assert res.returncode == 0, res.stderr
    photos = sorted(tmp_path.glob("photo_*.jpg"))
    assert [Image.open(p).size for p in photos] == [(320, 240)] * 5
    header, *lines = (tmp_path / "faces.csv").read_text().splitlines()
    assert header == "photo,x,y,w,h"
    counts = [sum(line.startswith(p.name + ",") for line in lines) for p in photos]
    assert counts == [0, 1, 2, 3, 0]  # 0-3 faces in turn
