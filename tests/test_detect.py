"""Face detection and Adience-like cropping (agegender.detect) on synthetic and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from numpy.typing import NDArray
from PIL import Image

from agegender.detect import (
    FACE_DY,
    FACE_SCALE,
    Box,
    FaceDetector,
    _drop_nested,
    crop_box,
    crop_face,
)
from agegender.synth.faces import render_face
from agegender.synth.photos import group_photo

U8 = NDArray[np.uint8]
N_ALIGNED = 60


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def aligned() -> list[U8]:
    """Synthetic aligned crops (what the model trains on) of varied users, ages and genders."""
    rng = np.random.default_rng(2024)
    return [
        np.asarray(
            render_face(
                f"t{i % 23}",
                1000 + i,
                f"t_{i}.jpg",
                float(rng.uniform(0.0, 80.0)),
                "mf"[i % 2],
                size=256,
                seed=5,
            )
        )
        for i in range(N_ALIGNED)
    ]


@pytest.fixture(scope="module")
def found(detector: FaceDetector, aligned: list[U8]) -> list[tuple[U8, Box]]:
    """The aligned faces the detector finds, each with its largest box."""
    out = []
    for img in aligned:
        boxes = detector.detect(img)
        if boxes:
            out.append((img, max(boxes, key=lambda b: b.w * b.h)))
    return out


def _centre_in(b: Box, region: tuple[int, int, int, int]) -> bool:
    x, y, w, h = region
    return x <= b.x + b.w / 2 < x + w and y <= b.y + b.h / 2 < y + h


def _iou(a: Box, region: tuple[int, int, int, int]) -> float:
    x, y, w, h = region
    iw = max(0, min(a.x + a.w, x + w) - max(a.x, x))
    ih = max(0, min(a.y + a.h, y + h) - max(a.y, y))
    inter = iw * ih
    return inter / (a.w * a.h + w * h - inter)


@pytest.mark.parametrize("size", [(640, 480), (1600, 900)])  # 1600: boxes scaled back from 640
def test_two_faces_found_in_order_and_cropped_like_the_aligned_images(
    detector: FaceDetector, size: tuple[int, int]
) -> None:
    photo, where = group_photo(2, *size, seed=0)
    rgb = np.asarray(photo)
    boxes = detector.detect(rgb)
    assert len(boxes) == 2, boxes
    assert boxes[0].x < boxes[1].x
    for box, region in zip(boxes, where, strict=True):
        assert _centre_in(box, region), (box, region)
        # The calibrated crop frames the face like the aligned image that was pasted there.
        assert _iou(crop_box(box), region) > 0.75, (crop_box(box), region)
        crop = crop_face(rgb, box)
        side = round(FACE_SCALE * max(box.w, box.h))
        assert crop.shape == (side, side, 3)
        assert crop.dtype == np.uint8


@pytest.mark.parametrize("seed", range(4))
def test_a_photo_without_faces_gives_no_box(detector: FaceDetector, seed: int) -> None:
    photo, where = group_photo(0, 800, 600, seed=seed)
    assert where == []
    assert detector.detect(np.asarray(photo)) == []


def test_a_real_photo_gives_its_one_face(detector: FaceDetector) -> None:
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    rgb = np.asarray(Image.open(path).convert("RGB"))  # 512 x 600 portrait
    boxes = detector.detect(rgb)
    assert len(boxes) == 1, boxes
    b = boxes[0]
    assert 180 <= b.w <= 280  # face (brows to mouth) about 230 px, centred near (265, 215)
    assert abs(b.x + b.w / 2 - 265) < 30
    assert abs(b.y + b.h / 2 - 215) < 30


def test_detection_rate_on_aligned_faces(found: list[tuple[U8, Box]]) -> None:
    # Measured 39/60 (65 %) with OpenCV 4.14 (56-61 % over 200-1000 faces in the calibration);
    # the misses are low-contrast cartoon faces. 45 % leaves margin for other OpenCV builds.
    assert len(found) >= 0.45 * N_ALIGNED, len(found)


def test_calibration_matches_the_aligned_faces(found: list[tuple[U8, Box]]) -> None:
    """The constants still describe the renderer: recalibrate if synth/faces.py changes the
    framing."""
    side = [img.shape[0] / b.w for img, b in found]
    dy = [(img.shape[0] / 2 - (b.y + b.h / 2)) / b.w for img, b in found]
    assert abs(float(np.median(side)) - FACE_SCALE) < 0.08  # measured 1.384
    assert abs(float(np.median(dy)) - FACE_DY) < 0.04  # measured -0.071


def test_a_cropped_face_is_found_again_with_the_same_framing(
    detector: FaceDetector, found: list[tuple[U8, Box]]
) -> None:
    ratios, shifts = [], []
    for img, box in found:
        crop = crop_face(img, box)
        again = detector.detect(crop)
        if not again:
            continue
        b = max(again, key=lambda b: b.w * b.h)
        ratios.append(crop.shape[0] / b.w)
        shifts.append((crop.shape[0] / 2 - (b.y + b.h / 2)) / b.w)
    assert len(ratios) >= 0.9 * len(found)  # the crop keeps what made the face detectable
    # Measured 38 of 39 found again, median 1.35 and -0.067 (a shade tighter than the first box).
    assert abs(float(np.median(ratios)) - FACE_SCALE) < 0.08, np.median(ratios)
    assert abs(float(np.median(shifts)) - FACE_DY) < 0.04, np.median(shifts)


def test_crop_near_the_border_repeats_the_edge_and_keeps_the_face_centred() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    box = Box(0, 0, 40, 40)  # a face at the top-left corner
    c = crop_box(box)
    assert (c.w, c.h) == (56, 56)  # round(1.39 * 40)
    assert (c.x, c.y) == (-8, -11)  # reaches beyond the top-left corner
    crop = crop_face(rgb, box)
    assert crop.shape == (56, 56, 3)
    px, py = -c.x, -c.y
    assert np.array_equal(crop[py:, px:], rgb[: 56 - py, : 56 - px])
    assert np.array_equal(crop[:py, px:], np.broadcast_to(rgb[0, : 56 - px], (py, 56 - px, 3)))
    assert np.array_equal(crop[:, :px], np.broadcast_to(crop[:, px : px + 1], (56, px, 3)))
    # The box's centre sits where the calibration puts it: at the crop's centre, FACE_DY up.
    assert abs((box.x + 20 - c.x) - 28) <= 0.5
    assert abs((box.y + 20 - c.y) - (28 - FACE_DY * 40)) <= 0.5

    far = Box(100, 70, 30, 30)  # bottom-right, partly outside the photo
    crop = crop_face(rgb, far)
    c = crop_box(far)
    assert crop.shape == (c.h, c.w, 3)
    assert np.array_equal(
        crop[:, 120 - c.x :],
        np.broadcast_to(crop[:, 119 - c.x : 120 - c.x], (c.h, c.x + c.w - 120, 3)),
    )
    assert np.array_equal(
        crop[100 - c.y :], np.broadcast_to(crop[99 - c.y], (c.y + c.h - 100, c.w, 3))
    )


def test_crop_of_a_box_outside_the_photo_is_an_error() -> None:
    rgb = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="outside the 50 x 50 photo"):
        crop_face(rgb, Box(200, 200, 10, 10))
    with pytest.raises(ValueError, match="positive size"):
        crop_face(rgb, Box(0, 0, 0, 10))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32), np.uint8),
        np.zeros((32, 32, 4), np.uint8),
        np.zeros((0, 32, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=["float", "grey", "rgba", "empty", "list"],
)
def test_bad_input_names_what_was_expected(detector: FaceDetector, bad: object) -> None:
    with pytest.raises(ValueError, match=r"RGB image|\(H, W, 3\)"):
        detector.detect(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"RGB image|\(H, W, 3\)"):
        crop_face(bad, Box(0, 0, 8, 8))  # type: ignore[arg-type]


def test_overlapping_duplicates_keep_the_larger() -> None:
    big, inner, other = Box(10, 10, 100, 100), Box(30, 30, 50, 50), Box(200, 10, 60, 60)
    assert sorted(_drop_nested([inner, other, big], 0.5), key=lambda b: b.x) == [big, other]
    touching = Box(90, 10, 100, 100)  # overlaps big by a fifth: two faces side by side
    assert len(_drop_nested([big, touching], 0.5)) == 2


def test_min_face_and_settings(detector: FaceDetector) -> None:
    photo, _ = group_photo(2, 640, 480, seed=0)
    rgb = np.asarray(photo)
    assert len(detector.detect(rgb)) == 2
    # Their boxes are 173 and 197 px, 36 % and 41 % of the shorter side (480 px).
    assert len(FaceDetector(min_face=0.3).detect(rgb)) == 2
    assert FaceDetector(min_face=0.5).detect(rgb) == []
    with pytest.raises(ValueError, match="min_face"):
        FaceDetector(min_face=0.0)
    with pytest.raises(ValueError, match="scale_factor"):
        FaceDetector(scale_factor=1.0)


def test_a_missing_cascade_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Haar cascade not found"):
        FaceDetector(cascade=tmp_path / "nope.xml")


def test_box_as_list() -> None:
    assert Box(1, 2, 3, 4).as_list() == [1, 2, 3, 4]
