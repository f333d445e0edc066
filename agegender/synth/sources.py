"""Synthetic copies of the pretraining sources' official layouts (CelebA, UTKFace).

Written file for file as the real downloads extract, and read back with `agegender.sources`'
readers, so pretraining runs the same code on them as on the real sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from agegender.labels import GENDERS
from agegender.parallel import Progress
from agegender.provenance import mark_synthetic
from agegender.sources import (
    CELEBA_ATTR_FILE,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGE_DIR,
    CELEBA_PARTITION_FILE,
    UTKFACE_DIR,
    UTKFACE_RACES,
    SourceData,
    check_name,
    read_source,
)
from agegender.synth.render import FaceJob, draw, stamped

CELEBA_YOUNG_BELOW = 35
"""Synthetic CelebA sets mark identities younger than this `Young`."""


@dataclass(frozen=True)
class SyntheticFace:
    """One image a synthetic source holds, as drawn (before anything is written or read)."""

    file: str  # relative to the image folder
    identity: int
    age_years: int  # 0-80
    gender: int  # 0 = male, 1 = female
    race: int  # 0-4 (written in UTKFace names only)
    partition: int  # CelebA 0/1/2; UTKFace -1
    attributes: tuple[int, ...]  # CelebA: the 40 values in CELEBA_ATTRIBUTES order; UTKFace: ()


_SALT = {"celeba": 2015, "utkface": 2017}  # the sets' publication years
_UTK_EPOCH = datetime(2017, 1, 1)


def plan_synthetic_source(fmt: str, n: int = 200, seed: int = 0) -> tuple[SyntheticFace, ...]:
    """The faces `write_synthetic_source(fmt, out, n, seed=seed)` writes, in file order.

    About two photos in three are of a new identity, the rest repeat a drawn one, so some
    identities have several photos. CelebA's partition is contiguous in file number (the first
    ~80 % train, ~10 % val, ~10 % test), as in the official file.
    """
    check_name(fmt)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if fmt == "celeba" and n > 999_999:
        raise ValueError(f"CelebA's 6-digit file names hold at most 999999 images, got n={n}")
    rng = np.random.default_rng([seed, _SALT[fmt]])
    n_ids = max(1, (2 * n) // 3)
    ages = rng.integers(0, 81, n_ids)
    genders = rng.integers(0, 2, n_ids)
    races = rng.integers(0, UTKFACE_RACES, n_ids)
    who = np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, n - n_ids)])
    rng.shuffle(who)
    out: list[SyntheticFace] = []
    if fmt == "celeba":
        values = rng.choice(np.array([-1, 1]), size=(n, len(CELEBA_ATTRIBUTES)))
        values[:, CELEBA_ATTRIBUTES.index("Male")] = np.where(genders[who] == 0, 1, -1)
        values[:, CELEBA_ATTRIBUTES.index("Young")] = np.where(
            ages[who] < CELEBA_YOUNG_BELOW, 1, -1
        )
        train, val = round(0.8 * n), round(0.9 * n)
        for i, (ident, row) in enumerate(zip(who.tolist(), values.tolist(), strict=True)):
            out.append(
                SyntheticFace(
                    file=f"{i + 1:06d}.jpg",
                    identity=ident,
                    age_years=int(ages[ident]),
                    gender=int(genders[ident]),
                    race=int(races[ident]),
                    partition=0 if i < train else 1 if i < val else 2,
                    attributes=tuple(row),
                )
            )
        return tuple(out)
    # UTKFace: unique capture times within 60 days, to the millisecond.
    stamps = rng.choice(60 * 86_400_000, size=n, replace=False)
    for ident, ms in zip(who.tolist(), stamps.tolist(), strict=True):
        when = _UTK_EPOCH + timedelta(milliseconds=ms)
        stamp = when.strftime("%Y%m%d%H%M%S") + f"{when.microsecond // 1000:03d}"
        age, gender, race = int(ages[ident]), int(genders[ident]), int(races[ident])
        out.append(
            SyntheticFace(
                file=f"{age}_{gender}_{race}_{stamp}.jpg.chip.jpg",
                identity=ident,
                age_years=age,
                gender=gender,
                race=race,
                partition=-1,
                attributes=(),
            )
        )
    return tuple(sorted(out, key=lambda f: f.file))


def write_synthetic_source(
    fmt: str,
    out: Path | str,
    n: int = 200,
    size: int = 178,
    seed: int = 0,
    workers: int = 0,
    progress: Progress | None = None,
) -> SourceData:
    """Write `n` synthetic faces to `out` in source `fmt`'s exact official layout; read it back.

    CelebA: `img_align_celeba/000001.jpg ...` at `size` x round(size * 218 / 178) (178 x 218 by
    default, as the aligned download), `list_attr_celeba.txt` (`Male` and `Young` from the drawn
    identity, the other 38 attributes random) and `list_eval_partition.txt`. UTKFace:
    `UTKFace/<age>_<gender>_<race>_<datetime>.jpg.chip.jpg`, square `size` images, as the
    "aligned & cropped" archive extracts. The image folder must be empty or hold only files this
    call writes (a rerun), so stale images of another draw never mix in.
    """
    faces = plan_synthetic_source(fmt, n, seed)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    out = Path(out)
    celeba = fmt == "celeba"
    image_dir = out / (CELEBA_IMAGE_DIR if celeba else UTKFACE_DIR)
    image_dir.mkdir(parents=True, exist_ok=True)
    names = {f.file for f in faces}
    with os.scandir(image_dir) as it:
        stray = sorted(e.name for e in it if not e.name.startswith(".") and e.name not in names)
    if stray:
        raise FileExistsError(
            f"{image_dir} already holds {len(stray)} files this draw does not write "
            f"(e.g. {stray[0]!r}); write to an empty folder"
        )
    height = round(size * 218 / 178) if celeba else size
    with stamped(out, {"format": fmt, "n": n, "size": size, "seed": seed}) as keep:
        mark_synthetic(out, {"format": fmt})
        jobs = [
            FaceJob(
                target=image_dir / f.file,
                user_id=f"{fmt}-{f.identity}",
                face_id=f.identity,
                image_name=f.file,
                age_years=float(f.age_years),
                gender=GENDERS[f.gender],
                size=height,
                seed=seed,
                width=size,
            )
            for f in faces
        ]
        draw(jobs, keep, workers, progress)
        if celeba:
            attr = [
                str(len(faces)),
                " ".join(CELEBA_ATTRIBUTES) + " ",
            ]  # the official header ends in a space
            attr += [f.file + " " + " ".join(f"{v:2d}" for v in f.attributes) for f in faces]
            _write_if_changed(out / CELEBA_ATTR_FILE, "\n".join(attr) + "\n")
            _write_if_changed(
                out / CELEBA_PARTITION_FILE, "".join(f"{f.file} {f.partition}\n" for f in faces)
            )
    return read_source(fmt, out)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
