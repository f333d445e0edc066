"""Synthetic datasets in the exact Adience layout, for every run that cannot use the real images.

The files written here (`fold_K_data.txt` + `aligned/<user>/landmark_aligned_face.<face>.<image>`)
are read by the same reader as a real download, so every code path is exercised. `like_metadata`
copies the real metadata row for row, which gives the synthetic set Adience's real users, folds and
label distribution (including its unlabelled and odd age strings and its duplicate rows).
`group_photo` draws a user-style photo with several faces, for the face detector of `predict`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from agegender import faces
from agegender.adience import COLUMNS, N_FOLDS, fold_file, read_fold
from agegender.faces import render_face
from agegender.labels import LEVI_HASSNER_AGE_STRINGS
from agegender.parallel import Progress, map_chunks
from agegender.provenance import mark_synthetic

_PAIR = re.compile(r"^\((\d+), (\d+)\)$")


@dataclass(frozen=True)
class SynthResult:
    out: Path
    rows: int
    images: int
    rewritten: int  # images written by this call (existing identical files are kept)


@dataclass(frozen=True)
class _Image:
    path: str
    user_id: str
    face_id: int
    original_image: str
    age_years: float | None
    gender: str | None


def _age_years(age: str, u: float) -> float | None:
    """A concrete age for drawing: inside a `(lo, hi)` range at fraction u, or the single number."""
    m = _PAIR.match(age.strip())
    if m:
        lo, hi = sorted((int(m.group(1)), int(m.group(2))))
        return lo + u * (min(hi, 90) - lo)
    return float(age) if age.strip().isdigit() else None


def random_structure(per_fold: int, seed: int) -> list[list[list[str]]]:
    """Metadata rows (12 strings each) for five folds of a small Flickr-like dataset.

    Every fold has its own users, all 8 age groups and both genders; about 5 % of rows lack an
    age or a gender label, and one row per fold is duplicated, as in the real files.
    """
    if per_fold < 8:
        raise ValueError(f"per_fold must be >= 8 to hold all 8 age groups, got {per_fold}")
    rng = np.random.default_rng([seed, 2014])
    folds: list[list[list[str]]] = []
    face_id = 1
    for _ in range(N_FOLDS):
        n_users = max(3, round(per_fold / 12))
        users = [f"{rng.integers(10**7, 10**8)}@N0{rng.integers(0, 9)}" for _ in range(n_users)]
        n_faces = max(8, per_fold // 4)
        faces = []
        for j in range(n_faces):
            group = j % 8
            gender = "mf"[(j + j // 8) % 2]
            faces.append((users[j % n_users], face_id, LEVI_HASSNER_AGE_STRINGS[group], gender))
            face_id += 1
        choice = list(range(n_faces)) + rng.integers(0, n_faces, per_fold - n_faces).tolist()
        rows = []
        for k, j in enumerate(choice[:per_fold]):
            user, fid, age, gender = faces[j]
            if k >= n_faces:  # keep the first row of every face labelled
                age = "None" if rng.random() < 0.05 else age
                gender = "u" if rng.random() < 0.05 else gender
            image = f"{rng.integers(10**9, 10**10)}_{rng.bytes(5).hex()}_o.jpg"
            x, y = rng.integers(0, 1200, 2)
            d = int(rng.integers(200, 900))
            rows.append(
                [
                    user,
                    image,
                    str(fid),
                    age,
                    gender,
                    str(x),
                    str(y),
                    str(d),
                    str(d),
                    str(rng.integers(-120, 120)),
                    str(rng.integers(-40, 40)),
                    str(rng.integers(0, 120)),
                ]
            )
        if per_fold >= 20:
            rows.insert(int(rng.integers(1, len(rows))), list(rows[0]))
        folds.append(rows)
    return folds


def copied_structure(metadata_dir: Path) -> list[list[list[str]]]:
    """The rows of real metadata files, unchanged (duplicates included), read strictly."""
    folds = []
    for k in range(N_FOLDS):
        path = fold_file(metadata_dir, k)
        read_fold(path, k)  # validates every row, with file and line in any error
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        folds.append([line.split("\t") for line in lines if line.strip()])
    return folds


def _render_chunk(jobs: list[tuple[_Image, Path, int, int, int, bool]]) -> list[bool]:
    """Draw and save each image; True where a file was (re)written."""
    written = []
    for img, target, size, seed, quality, keep_existing in jobs:
        if keep_existing and target.is_file():
            written.append(False)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        face = render_face(
            img.user_id,
            img.face_id,
            img.original_image,
            img.age_years,
            img.gender,
            size=size,
            seed=seed,
        )
        tmp = target.with_suffix(".tmp")
        face.save(tmp, format="JPEG", quality=quality)
        tmp.replace(target)
        written.append(True)
    return written


def write_synthetic(
    out: Path | str,
    size: int = 816,
    per_fold: int = 100,
    seed: int = 0,
    like_metadata: Path | str | None = None,
    workers: int = 0,
    quality: int = 90,
    progress: Progress | None = None,
) -> SynthResult:
    """Write a synthetic Adience download to `out` (metadata files + aligned JPEGs).

    Repeating a call with the same settings keeps the images already written (an interrupted run
    just continues); other settings redraw every image.
    """
    out = Path(out)
    folds = (
        copied_structure(Path(like_metadata))
        if like_metadata is not None
        else random_structure(per_fold, seed)
    )
    out.mkdir(parents=True, exist_ok=True)
    engine = hashlib.sha256(Path(faces.__file__).read_bytes()).hexdigest()[:16]
    settings = {"size": size, "seed": seed, "quality": quality, "engine": engine}
    stamp = out / ".synth.json"
    keep = stamp.is_file() and json.loads(stamp.read_text()) == settings
    stamp.unlink(missing_ok=True)
    mark_synthetic(out, {"format": "adience", "like_metadata": like_metadata is not None})
    images: dict[str, _Image] = {}
    n_rows = 0
    for k, rows in enumerate(folds):
        text = "\t".join(COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
        fold_file(out, k).write_text(text, encoding="utf-8")
        for r in rows:
            user, image, face, age, gender = r[:5]
            path = f"{user}/landmark_aligned_face.{face}.{image}"
            if path in images:
                continue
            # The face's place inside its age range is fixed per face, like a person's age.
            u = np.random.default_rng([seed, int(face)]).random()
            images[path] = _Image(
                path,
                user,
                int(face),
                image,
                _age_years(age, u),
                gender if gender in ("m", "f") else None,
            )
        n_rows += len(rows)
    aligned = out / "aligned"
    jobs = [(img, aligned / img.path, size, seed, quality, keep) for img in images.values()]
    written = map_chunks(_render_chunk, jobs, workers, progress)
    stamp.write_text(json.dumps(settings))
    return SynthResult(out=out, rows=n_rows, images=len(images), rewritten=sum(written))


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
