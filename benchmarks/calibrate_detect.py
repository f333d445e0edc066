"""Calibrates FACE_SCALE / FACE_DY of agegender.detect and times the detector.

    python benchmarks/calibrate_detect.py [--faces 400] [--size 256] [--images DIR] [--sweep]

Detects faces on aligned crops (synthetic ones from `render_face`, or real Adience aligned JPEGs
from --images) and prints the medians of image side / box side and of the crop centre's offset
from the box centre in box sides: the constants that make `crop_face` of a detection frame the
face like an aligned image. Then re-detects in those crops (the ratio should come back), and
times `detect` on synthetic group photos at common camera sizes. Figures go in notes and in the
comment above the constants, never into assertions on speed.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image

from agegender.detect import FACE_DY, FACE_SCALE, Box, FaceDetector, crop_face
from agegender.synth.faces import render_face
from agegender.synth.photos import group_photo


def aligned_faces(n: int, size: int, seed: int, images: Path | None) -> list[np.ndarray]:
    """Real aligned JPEGs when given, else synthetic ones of varied users, ids, ages, genders."""
    if images is not None:
        paths = sorted(images.rglob("*.jpg"))[:n]
        if not paths:
            raise SystemExit(f"no *.jpg under {images}")
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rng = np.random.default_rng(seed)
    return [
        np.asarray(
            render_face(
                f"calib{i % 97}",
                i,
                f"calib_{i}.jpg",
                float(rng.uniform(0.0, 80.0)),
                "mf"[i % 2],
                size=size,
                seed=seed,
            )
        )
        for i in range(n)
    ]


def largest(boxes: list[Box]) -> Box | None:
    return max(boxes, key=lambda b: b.w * b.h, default=None)


def calibrate(det: FaceDetector, faces: list[np.ndarray]) -> None:
    ratio, dx, dy = [], [], []
    for img in faces:
        box = largest(det.detect(img))
        if box is None:
            continue
        side = max(box.w, box.h)
        h, w = img.shape[:2]
        ratio.append(min(h, w) / side)
        dx.append((w / 2 - (box.x + box.w / 2)) / side)
        dy.append((h / 2 - (box.y + box.h / 2)) / side)
    n = len(faces)
    print(f"detected: {len(ratio)}/{n} aligned faces ({len(ratio) / n:.1%})")
    if not ratio:
        return
    for name, v in (
        ("image side / box side", ratio),
        ("centre dx / box", dx),
        ("centre dy / box", dy),
    ):
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        print(f"{name:>22}: median {med:+.3f}  (quartiles {q1:+.3f} .. {q3:+.3f})")
    print(f"in use: FACE_SCALE = {FACE_SCALE}, FACE_DY = {FACE_DY}")


def consistency(det: FaceDetector, faces: list[np.ndarray]) -> None:
    """Crop a detection with the constants in use and detect again: the framing must repeat."""
    back = []
    for img in faces:
        box = largest(det.detect(img))
        if box is None:
            continue
        crop = crop_face(img, box)
        again = largest(det.detect(crop))
        if again is not None:
            back.append(crop.shape[0] / max(again.w, again.h))
    if back:
        print(
            f"re-detected in the crop: {len(back)}; median crop side / box side "
            f"{np.median(back):.3f} (FACE_SCALE {FACE_SCALE})"
        )


def timing(det: FaceDetector, repeat: int) -> None:
    for w, h in ((640, 480), (1920, 1080), (4000, 3000)):
        photo, where = group_photo(4, w, h, seed=1)
        rgb = np.asarray(photo)
        found = det.detect(rgb)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            det.detect(rgb)
            times.append(1000 * (time.perf_counter() - start))
        print(
            f"detect {w}x{h}: best {min(times):.1f} ms, median {float(np.median(times)):.1f} ms "
            f"per photo ({repeat} runs; {len(found)} of {len(where)} faces found)"
        )


def real_photos() -> dict[str, np.ndarray]:
    """The few real photos the environment has: one face (matplotlib), none (scikit-learn)."""
    hopper = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    photos = {"grace_hopper (1 face)": np.asarray(Image.open(hopper).convert("RGB"))}
    try:  # not a dependency of this project: optional
        sk = importlib.import_module("sklearn.datasets")
    except ImportError:
        pass
    else:
        for name, img in zip(
            ("china (0)", "flower (0)"), sk.load_sample_images().images, strict=True
        ):
            photos[name] = img
    return {
        k: np.ascontiguousarray(np.asarray(v)[..., :3], dtype=np.uint8) for k, v in photos.items()
    }


def parameters(faces: list[np.ndarray]) -> None:
    """Synthetic faces found vs boxes on real photos, for the detector's main knobs."""
    real = real_photos()
    for sf, mn in ((1.05, 3), (1.05, 5), (1.1, 3), (1.1, 5), (1.2, 5)):
        det = FaceDetector(scale_factor=sf, min_neighbors=mn)
        found = sum(bool(det.detect(f)) for f in faces) / len(faces)
        boxes = ", ".join(f"{k}: {len(det.detect(v))}" for k, v in real.items())
        print(f"scale_factor {sf} min_neighbors {mn}: {found:.1%} of aligned; boxes on {boxes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=400)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, default=None, help="real aligned JPEGs instead")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also compare detector parameters")
    args = p.parse_args()
    det = FaceDetector()
    faces = aligned_faces(args.faces, args.size, args.seed, args.images)
    calibrate(det, faces)
    consistency(det, faces)
    timing(det, args.repeat)
    if args.sweep:
        parameters(faces)


if __name__ == "__main__":
    main()
