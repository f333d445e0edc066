"""Users' photos with several synthetic faces, for trying the face detector of `predict`.

`group_photo` pastes aligned faces side by side on a plain background and says where each one
is, so detection and cropping can be checked against the truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from agegender.synth.faces import render_face


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Gradient, sensor noise and a few plain shapes: texture and edges, but nothing face-like."""
    c0, c1 = rng.uniform(40, 220, (2, 3))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    base = np.broadcast_to(c0 * (1 - t) + c1 * t, (height, width, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # Large single-colour shapes only: a small dark blob pair could pass for eyes.
    for _ in range(int(rng.integers(1, 4))):
        w, h = rng.uniform(0.2, 0.6) * width, rng.uniform(0.2, 0.6) * height
        x, y = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        fill = tuple(int(v) for v in rng.integers(30, 230, 3))
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + w, y + h), fill=fill)
        else:
            draw.ellipse((x, y, x + w, y + h), fill=fill)
    # Mild noise: equalizeHist stretches a flat background's noise, and the cascade slows on it.
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def group_photo(
    n_faces: int, width: int, height: int, seed: int = 0, face_size: int | None = None
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A photo of `n_faces` different people side by side, and each face crop's (x, y, w, h).

    The faces are aligned crops as in the training data, pasted left to right without overlap into
    equal slots (random place in the slot, vertically centred with a little jitter), so a detector
    and cropper can be checked against where each face really is. `face_size` defaults to the
    largest size that fits (80 % of a slot, 60 % of the height).
    """
    if n_faces < 0:
        raise ValueError(f"n_faces must be >= 0, got {n_faces}")
    if width < 8 or height < 8:
        raise ValueError(f"width and height must be >= 8, got {width} x {height}")
    rng = np.random.default_rng([seed, 5318])
    photo = _background(width, height, rng)
    if n_faces == 0:
        return photo, []
    slot = width // n_faces
    size = face_size if face_size is not None else min(int(0.8 * slot), int(0.6 * height))
    if not 8 <= size <= min(slot, height):
        raise ValueError(
            f"face_size {size} must be in 8..{min(slot, height)} to fit {n_faces} faces side by "
            f"side in {width} x {height}"
        )
    boxes: list[tuple[int, int, int, int]] = []
    for k in range(n_faces):
        x = k * slot + int(rng.integers(0, slot - size + 1))
        spare = height - size
        y = spare // 2 + int(rng.integers(-(spare // 10), spare // 10 + 1))
        face = render_face(
            f"group{seed}",
            k,
            f"group{seed}_{k}.jpg",
            float(rng.uniform(1.0, 75.0)),
            "mf"[int(rng.integers(0, 2))],
            size=size,
            seed=seed,
        )
        photo.paste(face, (x, y))
        boxes.append((x, y, size, size))
    return photo, boxes


def write_photos(out: Path, count: int, width: int, seed: int = 0) -> list[Path]:
    """`count` users' photos (JPEG, 4:3) with 0-3 faces each, for trying `agegender predict`;
    `faces.csv` says where each face was drawn."""
    out.mkdir(parents=True, exist_ok=True)
    paths, lines = [], ["photo,x,y,w,h"]
    for i in range(count):
        photo, boxes = group_photo(i % 4, width, width * 3 // 4, seed=seed + i)
        path = out / f"photo_{i:04d}.jpg"
        photo.save(path, quality=90)
        paths.append(path)
        lines += [f"{path.name},{x},{y},{w},{h}" for x, y, w, h in boxes]
    (out / "faces.csv").write_text("\n".join(lines) + "\n")
    return paths
