"""Synthetic datasets in the exact Adience layout, for every run that cannot use the real images.

The files written here (`fold_K_data.txt` + `aligned/<user>/landmark_aligned_face.<face>.<image>`)
are read by the same reader as a real download, so every code path is exercised. `like_metadata`
copies the real metadata row for row, which gives the synthetic set Adience's real users, folds and
label distribution (including its unlabelled and odd age strings and its duplicate rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agegender.adience import COLUMNS, N_FOLDS, fold_file, read_fold
from agegender.labels import LEVI_HASSNER_AGE_STRINGS
from agegender.parallel import Progress
from agegender.provenance import mark_synthetic
from agegender.synth.render import FaceJob, draw, stamped

_PAIR = re.compile(r"^\((\d+), (\d+)\)$")


@dataclass(frozen=True)
class SynthResult:
    out: Path
    rows: int
    images: int
    rewritten: int  # images written by this call (existing identical files are kept)


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
    with stamped(out, {"size": size, "seed": seed, "quality": quality}) as keep:
        mark_synthetic(out, {"format": "adience", "like_metadata": like_metadata is not None})
        images: dict[str, FaceJob] = {}
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
                images[path] = FaceJob(
                    target=out / "aligned" / path,
                    user_id=user,
                    face_id=int(face),
                    image_name=image,
                    age_years=_age_years(age, u),
                    gender=gender if gender in ("m", "f") else None,
                    size=size,
                    seed=seed,
                    quality=quality,
                )
            n_rows += len(rows)
        written = draw(list(images.values()), keep, workers, progress)
    return SynthResult(out=out, rows=n_rows, images=len(images), rewritten=written)
