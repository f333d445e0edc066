"""Drawing faces into files, shared by every synthetic layout.

One job type, one renderer over chunks of jobs (run on all cores by `map_chunks`), and one
settings stamp: a rerun with the same settings and drawing engine keeps the files already there
(and their mtimes, so the cache's fingerprint, and every run keyed on it, stays the same).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agegender.parallel import Progress, map_chunks
from agegender.synth import faces
from agegender.synth.faces import render_face

STAMP = ".synth.json"


def engine() -> str:
    """The renderer's version (a hash of its source): a changed renderer redraws every image."""
    return hashlib.sha256(Path(faces.__file__).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class FaceJob:
    """One image to draw: `render_face`'s arguments, where it goes and how it is saved."""

    target: Path
    user_id: str
    face_id: int
    image_name: str
    age_years: float | None
    gender: str | None  # "m", "f" or None
    size: int  # the drawn square's side
    seed: int
    quality: int = 90  # JPEG
    width: int | None = None  # centre-crop the square to this width (CelebA's 178 x 218)


def render_chunk(jobs: list[FaceJob]) -> list[bool]:
    """Draw and save each image (via a hidden temporary file: readers ignore it)."""
    for job in jobs:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        img = render_face(
            job.user_id,
            job.face_id,
            job.image_name,
            job.age_years,
            job.gender,
            size=job.size,
            seed=job.seed,
        )
        if job.width is not None and job.width != job.size:
            left = (job.size - job.width) // 2
            img = img.crop((left, 0, left + job.width, job.size))
        tmp = job.target.with_name(f".{job.target.name}.tmp")
        img.save(tmp, format="JPEG", quality=job.quality)
        tmp.replace(job.target)
    return [True] * len(jobs)


def draw(
    jobs: Sequence[FaceJob], keep: bool, workers: int = 0, progress: Progress | None = None
) -> int:
    """Draw every job (`keep`: except those whose file exists); the number of files written."""
    todo = [job for job in jobs if not (keep and job.target.is_file())]
    return len(map_chunks(render_chunk, todo, workers, progress))


@contextmanager
def stamped(out: Path, settings: dict[str, Any]) -> Iterator[bool]:
    """Yields whether the last call into `out` had these settings (and this engine), i.e. whether
    its files may be kept. The stamp is removed first and written back only when the block ends
    without an error, so a half-written set is never taken for a finished one."""
    settings = {**settings, "engine": engine()}
    stamp = out / STAMP
    keep = stamp.is_file() and json.loads(stamp.read_text()) == settings
    stamp.unlink(missing_ok=True)
    yield keep
    stamp.write_text(json.dumps(settings))
