"""Face detection and Adience-like cropping for predictions on users' own photos.

The model was trained on Adience's aligned crops, not on whole photos, so `predict` first finds
the faces (OpenCV's Haar cascade: ships inside opencv-python, needs no download or GPU) and cuts
each one out the way the aligned images frame a face. Plain numpy/OpenCV on purpose: no Prefect
or MLflow, so it is cheap to import and to test.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import cv2.data  # not in the stubs of cv2 itself; holds the path of the bundled XML files
import numpy as np
from numpy.typing import NDArray

__all__ = ["FACE_DY", "FACE_SCALE", "Box", "FaceDetector", "crop_box", "crop_face"]

U8 = NDArray[np.uint8]

# Calibrated, not guessed (benchmarks/calibrate_detect.py): on synthetic aligned faces at 256 px,
# the crops the model trains on, the default detector finds 610 of 1000 (seed 2; 228 of 400 with
# seed 0). Over those, median image side / box side = 1.395 (1.391), quartiles 1.30 .. 1.52, and
# median (image centre - box centre) / box side = +0.003 (-0.007) across, ignored, and -0.072
# (-0.065) down; at 816 px (200 faces, seed 1) 1.390 and -0.060. The Haar box spans brows to mouth;
# the aligned crop adds more hair and forehead above than chin below: its centre is above the box's.
FACE_SCALE = 1.39
FACE_DY = -0.07

CASCADE = "haarcascade_frontalface_default.xml"
_HAAR_MIN = 24  # the cascade's training window: nothing smaller can be found


@dataclass(frozen=True)
class Box:
    """A face in the photo's own pixel coordinates (top-left corner, width, height)."""

    x: int
    y: int
    w: int
    h: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]

    def scaled(self, k: float) -> Box:
        return Box(round(self.x * k), round(self.y * k), round(self.w * k), round(self.h * k))


def _check_rgb(rgb: object) -> U8:
    """Fail early with the expected layout: OpenCV's own errors name neither shape nor dtype."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected an RGB image as a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"expected an RGB image as a uint8 array of shape (H, W, 3), got dtype {rgb.dtype} "
            f"and shape {rgb.shape}"
        )
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected a non-empty (H, W, 3) image, got shape {rgb.shape}")
    return rgb


def _drop_nested(boxes: list[Box], overlap: float) -> list[Box]:
    """The cascade's grouping can leave a second box on one face: keep the larger of the two."""
    kept: list[Box] = []
    for b in sorted(boxes, key=lambda b: b.w * b.h, reverse=True):
        if all(_inter(b, k) <= overlap * b.w * b.h for k in kept):
            kept.append(b)
    return kept


def _inter(a: Box, b: Box) -> int:
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    return max(0, w) * max(0, h)


class FaceDetector:
    """Frontal faces in an RGB photo, found on a small grey copy for speed.

    Defaults, measured by benchmarks/calibrate_detect.py --sweep (200 synthetic aligned faces;
    real photos: Grace Hopper from matplotlib, scikit-learn's faceless china and flower):
    scale_factor/min_neighbors 1.1/5 find 56 % of the synthetic faces and no false box; 1.1/3
    62 % but a box on the temple, 1.05/3 69 % but 2 boxes on Hopper and 3 on the flower, 1.05/5
    65 % and clean at 1.7x the time, 1.2/5 48 %. The misses are the cartoon style's (low-contrast
    brows and eyes), not size. max_side 640 keeps a photo near 50-70 ms (2 CPU cores) whatever
    the camera; 1024 finds more faces under 10 % of the shorter side at 2-4x the time, 1600 at
    10-14x. At 640 the cascade's 24 px window is 5 % of a 4:3 photo's shorter side: min_face.
    """

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_face: float = 0.05,
        max_side: int = 640,
        cascade: Path | str | None = None,
    ) -> None:
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0, got {min_neighbors}")
        if not 0.0 < min_face <= 1.0:
            raise ValueError(
                f"min_face must be a fraction of the shorter side in (0, 1], got {min_face}"
            )
        if max_side < _HAAR_MIN:
            raise ValueError(f"max_side must be >= {_HAAR_MIN}, got {max_side}")
        path = Path(cascade) if cascade is not None else Path(cv2.data.haarcascades) / CASCADE
        if not path.is_file():
            raise FileNotFoundError(
                f"Haar cascade not found at {path}: it ships with opencv-python(-headless) 4.x "
                "(cv2.data.haarcascades); reinstall it or pass cascade=<path to the XML>"
            )
        self._path = str(path)
        self._local = threading.local()
        if self._classifier().empty():
            raise ValueError(f"{path} is not a readable OpenCV cascade file")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face = min_face
        self.max_side = max_side

    def _classifier(self) -> cv2.CascadeClassifier:
        """One per thread: a CascadeClassifier shared by threads returns wrong boxes."""
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = cv2.CascadeClassifier(self._path)
        return cascade

    def detect(self, rgb: U8) -> list[Box]:
        """Faces left to right; histogram equalisation evens out dim or hazy photos first."""
        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        k = min(1.0, self.max_side / max(h, w))
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if k < 1.0:
            size = (max(1, round(w * k)), max(1, round(h * k)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)  # area: no aliasing
        grey = cv2.equalizeHist(grey)
        side = max(_HAAR_MIN, round(self.min_face * min(grey.shape)))
        if side > min(grey.shape):
            return []
        found = self._classifier().detectMultiScale(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
        )
        boxes = [
            Box(x, y, bw, bh).scaled(1 / k)
            for x, y, bw, bh in np.asarray(found, dtype=np.int64).reshape(-1, 4).tolist()
        ]
        return sorted(_drop_nested(boxes, 0.5), key=lambda b: (b.x, b.y))


def crop_box(box: Box, scale: float = FACE_SCALE, dy: float = FACE_DY) -> Box:
    """The square `crop_face` cuts, in photo pixels (it may reach beyond the photo)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if box.w <= 0 or box.h <= 0:
        raise ValueError(f"box must have a positive size, got {box}")
    big = max(box.w, box.h)
    side = max(1, round(scale * big))
    cx = box.x + box.w / 2.0
    cy = box.y + box.h / 2.0 + dy * big
    return Box(round(cx - side / 2.0), round(cy - side / 2.0), side, side)


def crop_face(rgb: U8, box: Box, scale: float = FACE_SCALE, dy: float = FACE_DY) -> U8:
    """A square crop framed like an Adience aligned face, so the model sees what it trained on.

    Parts beyond the photo repeat its edge pixels rather than black: a black band is a strong
    edge the model never saw, and cutting the crop short would move the face off-centre.
    """
    rgb = _check_rgb(rgb)
    c = crop_box(box, scale, dy)
    x1, y1 = c.x + c.w, c.y + c.h
    h, w = rgb.shape[:2]
    inner = rgb[max(0, c.y) : min(h, y1), max(0, c.x) : min(w, x1)]
    if inner.size == 0:
        raise ValueError(f"box {box} lies outside the {w} x {h} photo")
    pad = ((max(0, -c.y), max(0, y1 - h)), (max(0, -c.x), max(0, x1 - w)), (0, 0))
    out: U8 = np.pad(inner, pad, mode="edge")
    return out
