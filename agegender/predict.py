"""Prediction on new photos with a trained checkpoint, with exactly the training preprocessing.

Faces are found with OpenCV's Haar cascade (`agegender.detect`) and cropped with the margin of
the Adience alignment; each crop then goes through the cache's resize (`square_resize`) and the
evaluation's centre crop (or 10-crop over-sampling) and normalisation, with the statistics stored
in the checkpoint. Without detection (`detect=None`) a photo is decoded exactly as the cache
decodes a training image (`decode_image`: JPEG draft, centre square), so already aligned faces
get the very numbers the evaluation gave them. Files that cannot be used (missing, not an image,
corrupt, too many pixels) get a row saying why; the batch goes on.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from agegender.cache import decode_image, square_resize
from agegender.config import Config
from agegender.detect import Box, FaceDetector, crop_face
from agegender.images import MAX_PIXELS, ImageRefused, open_image, to_rgb
from agegender.models import LeviHassner, build_model, to_input
from agegender.train import RunError, load_checkpoint, select_device
from agegender.transforms import Normalize, center_crop, ten_crops

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECT_SIDE = 2048  # JPEGs are decoded at reduced scale down to this longer side for detection
UInt8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Predictor:
    """A trained net with everything needed to use it: sizes, normalisation, label names."""

    model: LeviHassner
    crop: int
    image_size: int
    normalize: Normalize
    labels: dict[str, list[str]]
    device: torch.device

    @classmethod
    def load(cls, checkpoint: Path | str, device: str = "auto") -> Predictor:
        try:
            best = load_checkpoint(checkpoint)
            config = Config.model_validate(best["config"])
            labels = {h: list(v) for h, v in best["labels"].items()}
        except RunError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise RunError(f"{checkpoint}: not a readable agegender best.pt ({exc})") from None
        crop = int(best["crop"])
        model = build_model(
            best["task"], crop, config.model, classes={h: len(v) for h, v in labels.items()}
        )
        model.load_state_dict(best["model"])
        dev = select_device(device)
        model.to(dev).eval()
        return cls(
            model=model,
            crop=crop,
            # checkpoints from before the size was stored: the paper's 227 of 256
            image_size=int(best.get("image_size", round(crop * 256 / 227))),
            normalize=Normalize.from_state(best["normalize"]),
            labels=labels,
            device=dev,
        )

    def preprocessing(self) -> dict[str, Any]:
        """What a user of the model needs to know to feed it (logged with served models)."""
        return {
            "image_size": self.image_size,
            "crop": self.crop,
            "normalize": self.normalize.describe(),
            "labels": self.labels,
        }

    @torch.no_grad()
    def probabilities(
        self, images: UInt8, oversample: bool = False
    ) -> dict[str, npt.NDArray[np.float32]]:
        """uint8 (N, size, size, 3) -> head -> (N, classes) softmax (10-crop mean if asked)."""
        batch = self.normalize(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        views = ten_crops(batch, self.crop) if oversample else [center_crop(batch, self.crop)]
        total: dict[str, torch.Tensor] = {}
        for view in views:
            out = self.model(to_input(view, channels_last=False))
            for head, logits in out.items():
                total[head] = total.get(head, 0) + logits.float().softmax(1)
        return {h: (t / len(views)).cpu().numpy() for h, t in total.items()}

    def answer(self, probs: dict[str, npt.NDArray[np.float32]], i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for head, p in probs.items():
            k = int(p[i].argmax())
            names = self.labels[head]
            out[head] = names[k]
            out[f"{head}_prob"] = round(float(p[i][k]), 4)
            out[f"{head}_probs"] = {n: round(float(v), 4) for n, v in zip(names, p[i], strict=True)}
        return out


@dataclass
class Photo:
    """One input photo, ready for the net: its face crops (resized), or why there are none."""

    name: str
    faces: list[tuple[Box | None, UInt8]] = field(default_factory=list)
    status: str = "face"  # face | whole image | no face | error
    error: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        base = {"path": self.name, "face": None, "box": None, "status": self.status}
        if not self.faces:
            return [base | {"error": self.error}]
        return [
            base | {"face": i, "box": box.as_list() if box else None, "error": None}
            for i, (box, _) in enumerate(self.faces)
        ]


def collect_paths(inputs: Sequence[Path | str]) -> list[str]:
    """Images named by files, folders (recursively, image suffixes only) and `.txt` lists."""
    out: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            out += map(str, found)
        elif item.suffix.lower() == ".txt" and item.is_file():
            lines = item.read_text(encoding="utf-8", errors="replace").splitlines()
            out += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        else:
            out.append(str(item))  # missing files get their error row
    return out


def _open(source: str | io.BytesIO, max_pixels: int) -> Image.Image:
    """An opened image whose size was checked before any pixel is decoded."""
    try:
        return open_image(source, max_pixels)
    except UnidentifiedImageError:  # its words name a file object's address
        raise ValueError("not an image file (JPEG, PNG, ...)") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not an image PIL can read ({type(exc).__name__}: {exc})") from None


def _decode(im: Image.Image) -> tuple[UInt8, float]:
    """Upright RGB (EXIF orientation applied), JPEGs at reduced scale, and the scale used."""
    try:
        with im:
            w = im.size[0]
            if im.format == "JPEG" and max(im.size) > DETECT_SIDE:
                k = DETECT_SIDE / max(im.size)
                im.draft("RGB", (round(im.size[0] * k), round(im.size[1] * k)))
            scale = w / im.size[0]
            ImageOps.exif_transpose(im, in_place=True)  # no copy: 4 bytes a pixel each
            rgb = to_rgb(im)
    except ImageRefused:
        raise
    except Exception as exc:  # truncated or corrupt data shows only when decoding
        raise ValueError(f"cannot decode ({type(exc).__name__}: {exc})") from None
    return rgb, scale


def load_photo(path: str, size: int, max_pixels: int = MAX_PIXELS) -> UInt8:
    """The training decode of one photo; a clear ValueError for anything unusable."""
    if not os.path.isfile(path):
        raise ValueError("file not found")
    _open(path, max_pixels).close()
    try:
        return decode_image(path, size, max_pixels=max_pixels)
    except ImageRefused:
        raise
    except Exception as exc:  # truncated or corrupt data shows only when decoding
        raise ValueError(f"cannot decode ({type(exc).__name__}: {exc})") from None


def find_faces(rgb: UInt8, size: int, detector: FaceDetector) -> list[tuple[Box, UInt8]]:
    """Each face cropped like the Adience alignment and resized as in training."""
    return [(box, square_resize(crop_face(rgb, box), size)) for box in detector.detect(rgb)]


def _photo(name: str, rgb: UInt8, size: int, detector: FaceDetector | None, scale: float) -> Photo:
    """A decoded photo as model inputs; boxes in the original photo's pixels (`scale` undoes a
    reduced-scale decode)."""
    if detector is None:
        return Photo(name, [(None, square_resize(rgb, size))], status="whole image")
    faces: list[tuple[Box | None, UInt8]] = [
        (box.scaled(scale), crop) for box, crop in find_faces(rgb, size, detector)
    ]
    return Photo(name, faces, status="face" if faces else "no face")


def prepare_array(name: str, rgb: UInt8, size: int, detector: FaceDetector | None) -> Photo:
    """A decoded photo (from a request, say) as model inputs."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        error = f"expected uint8 H x W x 3, got {rgb.dtype} {rgb.shape}"
        return Photo(name, status="error", error=error)
    return _photo(name, rgb, size, detector, 1.0)


def prepare_bytes(
    name: str, data: bytes, size: int, detector: FaceDetector | None, max_pixels: int = MAX_PIXELS
) -> Photo:
    """Encoded image bytes (a JPEG or PNG sent to a server) as model inputs."""
    try:
        rgb, scale = _decode(_open(io.BytesIO(data), max_pixels))
    except ValueError as exc:
        return Photo(name, status="error", error=str(exc))
    return _photo(name, rgb, size, detector, scale)


def prepare_path(
    path: str, size: int, detector: FaceDetector | None, max_pixels: int = MAX_PIXELS
) -> Photo:
    """A photo file as model inputs; without detection exactly the training decode."""
    try:
        if detector is None:
            return Photo(path, [(None, load_photo(path, size, max_pixels))], status="whole image")
        if not os.path.isfile(path):
            raise ValueError("file not found")
        rgb, scale = _decode(_open(path, max_pixels))
    except ValueError as exc:
        return Photo(path, status="error", error=str(exc))
    return _photo(path, rgb, size, detector, scale)


def prepared(
    paths: Sequence[str],
    size: int,
    detector: FaceDetector | None,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
) -> Iterator[Photo]:
    """`prepare_path` over threads (PIL, OpenCV and torch release the GIL), in order, with a
    bounded window so a directory of any size never sits in memory."""
    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        window: deque[Future[Photo]] = deque()
        for path in paths:
            window.append(pool.submit(prepare_path, path, size, detector, max_pixels))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def predict_photos(
    predictor: Predictor,
    photos: Iterable[Photo],
    oversample: bool = False,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    probabilities: Callable[[UInt8, bool], dict[str, npt.NDArray[np.float32]]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows in photo order: one per face (or one saying why there is none). Faces of several
    photos share a batch; `progress` gets the number of photos done. `probabilities` replaces
    the predictor's own (the model server's batcher: faces of other requests join the pass)."""
    forward = probabilities or predictor.probabilities
    pending: list[Photo] = []
    queued = done = 0

    def flush() -> Iterator[dict[str, Any]]:
        nonlocal done
        crops = [img for p in pending for _, img in p.faces]
        probs = forward(np.stack(crops), oversample) if crops else {}
        i = 0
        for p in pending:
            for row in p.rows():
                if row["face"] is not None:
                    row |= predictor.answer(probs, i)
                    i += 1
                yield row
        done += len(pending)
        if progress:
            progress(done)
        pending.clear()

    for photo in photos:
        pending.append(photo)
        queued += len(photo.faces)
        if queued >= batch_size:
            yield from flush()
            queued = 0
    if pending:
        yield from flush()


def predict_paths(
    predictor: Predictor,
    paths: Sequence[str],
    oversample: bool = False,
    batch_size: int = 64,
    max_pixels: int = MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    detector: FaceDetector | None = None,
) -> Iterator[dict[str, Any]]:
    """A row per face of each path (per path without a detector), in order."""
    photos = prepared(paths, predictor.image_size, detector, max_pixels)
    report = (lambda n: progress(n, len(paths))) if progress else None
    yield from predict_photos(predictor, photos, oversample, batch_size, report)
