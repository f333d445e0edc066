"""Prediction throughput on a directory of photos, with and without face detection, in one process.

    python benchmarks/predict.py [--photos 48] [--width 1280 --height 720] [--device auto]

The model is the paper's net (227 crops of 256 images; its weights do not change the speed).
Photos are synthetic group photos (1-3 faces, JPEG). Baseline: the obvious loop, one photo at a
time: full decode, detect, crop, resize, one forward pass per face. Then `predict_paths` (the
`agegender predict` path: reduced-scale JPEG decode, decode and detection on threads, faces of
several photos in one batch) with detection, and without it (each photo one aligned face).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agegender.cache import square_resize
from agegender.config import Config
from agegender.detect import FaceDetector, crop_face
from agegender.labels import AGE_GROUPS, GENDERS
from agegender.models import build_model
from agegender.predict import Predictor, predict_paths
from agegender.synth.photos import group_photo


def make_model(path: Path, crop: int, image_size: int) -> Path:
    config = Config()
    labels = {"age": list(AGE_GROUPS), "gender": list(GENDERS)}
    model = build_model(
        "multitask", crop, config.model, classes={h: len(v) for h, v in labels.items()}
    )
    torch.save(
        {
            "model": model.state_dict(),
            "task": "multitask",
            "crop": crop,
            "image_size": image_size,
            "config": config.model_dump(mode="json"),
            "normalize": {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.25, 0.25]},
            "labels": labels,
        },
        path,
    )
    return path


def baseline(predictor: Predictor, paths: list[str], detector: FaceDetector) -> int:
    """The obvious loop; returns the number of faces."""
    faces = 0
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for box in detector.detect(rgb):
            crop = square_resize(crop_face(rgb, box), predictor.image_size)
            predictor.probabilities(crop[None])
            faces += 1
    return faces


def timed(label: str, run: object, n: int, base: float | None) -> float:
    assert callable(run)
    start = time.perf_counter()
    faces = run()
    rate = n / (time.perf_counter() - start)
    ratio = f"  ratio {rate / base:.2f}x vs baseline" if base else ""
    print(f"{label:44} {rate:8.1f} photos/s  ({faces} faces){ratio}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for i in range(a.photos):
            photo, _ = group_photo(1 + i % 3, a.width, a.height, seed=i)
            paths.append(str(root / f"photo{i:03d}.jpg"))
            photo.save(paths[-1], quality=90)
        predictor = Predictor.load(make_model(root / "best.pt", a.crop, a.image_size), a.device)
        detector = FaceDetector()
        print(
            f"{a.photos} photos of {a.width} x {a.height} px, model {a.crop}/{a.image_size} on "
            f"{predictor.device}, batch {a.batch_size}"
        )
        predictor.probabilities(np.zeros((2, a.image_size, a.image_size, 3), np.uint8))  # warm

        def faces(detect: bool) -> int:
            rows = predict_paths(
                predictor, paths, batch_size=a.batch_size, detector=detector if detect else None
            )
            return sum(r["face"] is not None for r in rows)

        n = len(paths)
        base = timed(
            "baseline: one photo, one face at a time",
            lambda: baseline(predictor, paths, detector),
            n,
            None,
        )
        timed("predict_paths, with detection", lambda: faces(True), n, base)
        timed("predict_paths, no detection (whole image)", lambda: faces(False), n, base)
        start = time.perf_counter()
        for p in paths:
            detector.detect(np.asarray(Image.open(p).convert("RGB")))
        rate = n / (time.perf_counter() - start)
        print(f"{'(decode + detect alone, one thread)':44} {rate:8.1f} photos/s")


if __name__ == "__main__":
    main()
