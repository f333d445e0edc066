"""The decode-once image cache: every image of a dataset decoded once into a uint8 memmap.

Training reads ~50 epochs x 15k images; decoding 816x816 JPEGs each time would starve any GPU.
The cache stores square RGB uint8 images (antialiased resize, or with `resize="caffe"` the
authors' cv::resize without antialiasing; a non-square image such as CelebA's 178x218 aligned
faces is centre-cropped to a square first) in `images.npy`, the labelled
rows that have an image in `index.tsv`, the images and rows that could not be used in
`report.tsv`, and in `manifest.json` a fingerprint of inputs and settings. A rebuild on unchanged
inputs decodes nothing; a changed dataset reuses every image whose file did not change.

Adience (`build_cache`, `open_cache`) and the pretraining sources CelebA and UTKFace
(`build_source_cache`, `open_source_cache`) share all of this; only the index columns differ.
The manifest is written last, so a killed build leaves either the old cache or none.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.adience import Row, Table, metadata_digest, read_metadata
from agegender.config import CacheConfig, Resize
from agegender.images import MAX_PIXELS, ImageRefused, open_image, to_rgb
from agegender.parallel import Progress, map_chunks, torch_threads
from agegender.provenance import synthetic_marker
from agegender.sources import FaceRecord, SourceData, read_source

FORMAT_VERSION = 2  # 2: a `path` column for every dataset; non-square images centre-cropped
MANIFEST = "manifest.json"
IMAGES = "images.npy"
INDEX = "index.tsv"
REPORT = "report.tsv"
DATASET_NAMES = {"adience": "Adience", "celeba": "CelebA", "utkface": "UTKFace"}
FILE_FIELDS = ("slot", "path", "size", "mtime_ns")
LABEL_FIELDS = {
    "adience": ("fold", "user_id", "original_image", "face_id", "age", "gender", "source"),
    "source": ("age", "gender", "partition", "source"),
}

UInt8Array = npt.NDArray[np.uint8]


class CacheError(RuntimeError):
    """A cache directory that is missing, incomplete or of another format."""


@dataclass(frozen=True)
class Problem:
    path: str
    source: str
    problem: str


@dataclass(frozen=True)
class BuildResult:
    cache_dir: Path
    fingerprint: str
    images: int
    decoded: int
    reused: int
    problems: tuple[Problem, ...]
    rebuilt: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "cache": str(self.cache_dir),
            "fingerprint": self.fingerprint,
            "images": self.images,
            "decoded": self.decoded,
            "reused": self.reused,
            "skipped": len(self.problems),
            "report": str(self.cache_dir / REPORT),
        }


@dataclass(frozen=True)
class ImageCache:
    """An opened cache of any dataset: `images[slots[i]]` is the picture of row i."""

    path: Path
    slots: npt.NDArray[np.int64]
    images: UInt8Array
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["settings"]["image_size"])

    @property
    def resize(self) -> Resize:
        """How the images were resized ("antialias" for caches built before the option)."""
        return "caffe" if self.manifest["settings"].get("resize") == "caffe" else "antialias"

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def synthetic(self) -> bool:
        """Made by `agegender synth` (its marker), not a real download."""
        if "synthetic" in self.manifest:
            return self.manifest["synthetic"] is not None
        # a cache built before the marker was recorded: look at its data root
        return synthetic_marker(Path(self.manifest.get("data_root", ""))) is not None

    def image(self, row: int) -> UInt8Array:
        return np.asarray(self.images[self.slots[row]])


@dataclass(frozen=True)
class Cache(ImageCache):
    """An Adience cache: row i is `table.rows[i]`."""

    table: Table


@dataclass(frozen=True)
class SourceCache(ImageCache):
    """A pretraining source's cache: row i is `records[i]`; age label k is `age_classes[k]`."""

    records: tuple[FaceRecord, ...]
    age_classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.records)


def aligned_dir(data_root: Path) -> Path:
    """`aligned/` inside a download root; the folder itself is accepted too."""
    data_root = Path(data_root)
    if (data_root / "aligned").is_dir():
        return data_root / "aligned"
    if data_root.name == "aligned" and data_root.is_dir():
        return data_root
    raise FileNotFoundError(
        f"{data_root}: no 'aligned/' folder; --data-root must be the Adience download that "
        "contains aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>"
    )


def decode_image(
    path: Path | str,
    size: int,
    draft: bool = True,
    max_pixels: int = MAX_PIXELS,
    resize: Resize = "antialias",
) -> UInt8Array:
    """size x size RGB uint8: JPEG decoded at reduced scale (never with `resize="caffe"`, which
    decodes in full as cv::imread does), then `square_resize`; an image of more than
    `max_pixels` is refused from its header (`ImageRefused`), as `predict` does."""
    with open_image(str(path), max_pixels) as im:
        if draft and resize != "caffe" and im.format == "JPEG":
            im.draft("RGB", (size, size))  # DCT scaling, never below the requested size
        rgb = to_rgb(im)
    return square_resize(rgb, size, resize)


def square_resize(rgb: UInt8Array, size: int, resize: Resize = "antialias") -> UInt8Array:
    """The centre square (aligned faces sit in the middle; CelebA is 178x218), resized to
    size x size: antialiased bilinear (torch resizes uint8 several times faster than PIL), or
    with "caffe" cv::resize's bilinear without antialiasing (INTER_LINEAR), with which Caffe's
    convert_imageset made the authors' 256 px images (it squashed a non-square image instead
    of cropping it; Adience's aligned faces are square)."""
    import torch
    from torch.nn.functional import interpolate

    h, w = rgb.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        rgb = rgb[top : top + side, left : left + side]
    if rgb.shape[:2] == (size, size):
        return np.array(rgb, copy=True)
    if resize == "caffe":  # OpenCV is already ours (face detection): its very resize
        import cv2

        square = np.ascontiguousarray(rgb)
        return np.asarray(
            cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.uint8
        )
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    out = interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def _settings(config: CacheConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "image_size": config.image_size,
        "draft": config.draft,
        "format": FORMAT_VERSION,
    }
    if config.resize != "antialias":  # caches built before the option keep their fingerprint
        settings["resize"] = config.resize
    return settings


@dataclass(frozen=True)
class _Item:
    """One labelled row to cache: its image (relative to the image folder) and index columns."""

    path: str
    source: str  # where the row is listed, for the report
    labels: tuple[Any, ...]  # the dataset's LABEL_FIELDS, in order


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if path.is_file() else None


def _fingerprint(
    settings: dict[str, Any], meta_digest: str, files: Sequence[tuple[str, int, int]]
) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(meta_digest.encode())
    for path, size, mtime in sorted(files):
        h.update(f"{path}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((Path(cache_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data


def _decode_into(
    out: UInt8Array, size: int, draft: bool, resize: Resize, jobs: list[tuple[int, str]]
) -> list[tuple[int, str | None]]:
    """Decode jobs (slot, file) into `out[slot]`; a problem string for each image that failed."""
    results: list[tuple[int, str | None]] = []
    for slot, path in jobs:
        try:
            out[slot] = decode_image(path, size, draft, resize=resize)
            results.append((slot, None))
        except ImageRefused as exc:  # opened, but not decoded: say why, and the limit
            results.append((slot, f"not decoded: {exc}"))
        except Exception as exc:  # any unreadable image is reported, never fatal
            results.append((slot, f"cannot decode: {type(exc).__name__}: {exc}"))
    return results


def build_cache(
    data_root: Path | str,
    cache_dir: Path | str,
    metadata_dir: Path | str | None = None,
    config: CacheConfig | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Decode every image the Adience metadata names into `cache_dir`, reusing what is there."""
    aligned = aligned_dir(Path(data_root))
    table = read_metadata(metadata_dir if metadata_dir is not None else Path(data_root))
    items = [
        _Item(
            r.path,
            r.source,
            (r.fold, r.user_id, r.original_image, r.face_id, r.age, r.gender, r.source),
        )
        for r in table.rows
    ]
    marker = synthetic_marker(Path(data_root))
    extra = {
        "dataset": "adience",
        "data_root": str(Path(data_root).resolve()),
        "metadata": [str(f.resolve()) for f in table.files],
        "duplicates": table.duplicates,
        "synthetic": marker,
    }
    digest = metadata_digest(table) + _marker_digest(marker)
    return _build(aligned, items, digest, Path(cache_dir), config, progress, extra)


def _marker_digest(marker: dict[str, Any] | None) -> str:
    """Synthetic data count as other data: their fingerprint differs from any real one's."""
    return "" if marker is None else "\nsynthetic:" + json.dumps(marker, sort_keys=True)


def build_source_cache(
    name: str,
    root: Path | str,
    cache_dir: Path | str,
    config: CacheConfig | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """The same decode-once cache for a pretraining source ("celeba" or "utkface")."""
    src = read_source(name, root)
    items = [_Item(r.path, r.source, (r.age, r.gender, r.partition, r.source)) for r in src.records]
    skipped = [Problem("", name, text) for text in src.problems]
    marker = synthetic_marker(Path(root))
    extra = {
        "dataset": name,
        "data_root": str(Path(root).resolve()),
        "age_classes": list(src.age_classes),
        "synthetic": marker,
    }
    return _build(
        src.image_dir,
        items,
        _records_digest(src) + _marker_digest(marker),
        Path(cache_dir),
        config,
        progress,
        extra,
        skipped,
    )


def _records_digest(src: SourceData) -> str:
    """Content hash of a source's labels (its part of the data fingerprint)."""
    h = hashlib.sha256(f"{src.name}\t{','.join(src.age_classes)}\n".encode())
    for r in src.records:
        h.update(f"{r.path}\t{r.age}\t{r.gender}\t{r.partition}\n".encode())
    return h.hexdigest()


def _build(
    image_dir: Path,
    items: list[_Item],
    digest: str,
    cache_dir: Path,
    config: CacheConfig | None,
    progress: Progress | None,
    extra: dict[str, Any],
    skipped: Sequence[Problem] = (),
) -> BuildResult:
    config = config or CacheConfig()
    settings = _settings(config)
    problems: list[Problem] = list(skipped)
    present: list[tuple[_Item, tuple[int, int]]] = []
    for item in items:
        st = _stat(image_dir / item.path)
        if st is None:
            problems.append(Problem(item.path, item.source, "missing file"))
        else:
            present.append((item, st))
    if not present:  # an empty cache would only fail later, at training
        first = next((p for p in problems if p.problem == "missing file"), None)
        raise CacheError(
            f"{image_dir}: none of the {len(items)} images the metadata lists is there"
            + (f" ({first.path}, listed at {first.source}, ...)" if first else "")
            + "; is the data root the download's?"
        )
    unique = {item.path: st for item, st in present}
    fingerprint = _fingerprint(settings, digest, [(p, *st) for p, st in unique.items()])

    old = read_manifest(cache_dir)
    if old and old.get("fingerprint") == fingerprint and (cache_dir / IMAGES).is_file():
        return BuildResult(
            cache_dir,
            fingerprint,
            int(old["images"]),
            0,
            int(old["images"]),
            tuple(Problem(**p) for p in old["problems"]),
            rebuilt=False,
        )

    # Slots: one per distinct image path, in row order.
    slot_of: dict[str, int] = {}
    for path in unique:
        slot_of[path] = len(slot_of)
    reusable = _reusable(cache_dir, old, settings, unique)

    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("images.tmp-*.npy"):  # left by a killed build
        stale.unlink()
    tmp_images = cache_dir / f"images.tmp-{os.getpid()}.npy"
    size = config.image_size
    out = np.lib.format.open_memmap(
        tmp_images, mode="w+", dtype=np.uint8, shape=(max(1, len(slot_of)), size, size, 3)
    )
    if reusable:
        old_images = np.load(cache_dir / IMAGES, mmap_mode="r")
        for path, old_slot in reusable.items():
            out[slot_of[path]] = old_images[old_slot]
        del old_images
    jobs = [(slot, str(image_dir / p)) for p, slot in slot_of.items() if p not in reusable]
    # Threads, not processes: PIL's decoder and torch's resize release the GIL, and threads need
    # no interpreter start-up (measured: 2 threads ~1.9x one, 4 processes cost seconds to spawn).
    decode = partial(_decode_into, out, size, config.draft, config.resize)
    with torch_threads(1):
        results = map_chunks(decode, jobs, config.workers, progress, threads=True)
    out.flush()
    del out
    failed = {slot: err for slot, err in results if err}

    failed_paths = {p: failed[s] for p, s in slot_of.items() if s in failed}
    kept: list[tuple[int, _Item, tuple[int, int]]] = []
    for item, st in present:
        if item.path in failed_paths:
            problems.append(Problem(item.path, item.source, failed_paths[item.path]))
        else:
            kept.append((slot_of[item.path], item, st))
    if not kept:  # the old cache, if any, stays as it was
        tmp_images.unlink()
        path, why = next(iter(failed_paths.items()))
        raise CacheError(
            f"{image_dir}: none of the {len(unique)} images could be decoded ({path}: {why}, ...)"
        )

    (cache_dir / MANIFEST).unlink(missing_ok=True)
    os.replace(tmp_images, cache_dir / IMAGES)
    kind = "adience" if extra["dataset"] == "adience" else "source"
    _write_index(cache_dir / INDEX, LABEL_FIELDS[kind], kept)
    _write_report(cache_dir / REPORT, problems)
    n_images = len(unique) - len(failed)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "settings": settings,
        **extra,
        "rows": len(kept),
        "images": n_images,
        "slots": len(slot_of),
        "problems": [p.__dict__ for p in problems],
    }
    (cache_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return BuildResult(
        cache_dir,
        fingerprint,
        n_images,
        len(jobs) - len(failed),
        len(reusable),
        tuple(problems),
        rebuilt=True,
    )


def _reusable(
    cache_dir: Path,
    old: dict[str, Any] | None,
    settings: dict[str, Any],
    files: dict[str, tuple[int, int]],
) -> dict[str, int]:
    """Old slot of every path whose file and decode settings are unchanged since the last build."""
    if not old or old.get("settings") != settings or not (cache_dir / INDEX).is_file():
        return {}
    out: dict[str, int] = {}
    for rec in _read_index_records(cache_dir / INDEX):
        if files.get(rec["path"]) == (int(rec["size"]), int(rec["mtime_ns"])):
            out[rec["path"]] = int(rec["slot"])
    return out


def _write_index(
    path: Path, fields: tuple[str, ...], entries: list[tuple[int, _Item, tuple[int, int]]]
) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow((*FILE_FIELDS, *fields))
        for slot, item, (size, mtime) in entries:
            w.writerow([slot, item.path, size, mtime, *item.labels])


def _write_report(path: Path, problems: list[Problem]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["path", "metadata", "problem"])
        for p in problems:
            w.writerow([p.path, p.source, p.problem])


def _read_index_records(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _open(cache_dir: Path, want: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Manifest and index records of a finished cache of the wanted kind."""
    manifest = read_manifest(cache_dir)
    build = "run `agegender prepare`" if want == "adience" else "`agegender pretrain` builds it"
    if manifest is None:
        raise CacheError(f"{cache_dir}: no {MANIFEST}; {build}")
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(
            f"{cache_dir}: cache format {manifest.get('format')}, this version reads "
            f"{FORMAT_VERSION}; rebuild it ({build})"
        )
    dataset = manifest["dataset"]
    if (want == "adience") != (dataset == "adience"):
        wanted = "Adience" if want == "adience" else "CelebA or UTKFace"
        raise CacheError(
            f"{cache_dir}: a cache of {DATASET_NAMES[dataset]}, but one of {wanted} is needed here"
        )
    return manifest, _read_index_records(cache_dir / INDEX)


def _slots(recs: list[dict[str, str]]) -> npt.NDArray[np.int64]:
    return np.array([int(r["slot"]) for r in recs], dtype=np.int64)


def open_cache(cache_dir: Path | str) -> Cache:
    """Open a finished Adience cache (memory-mapped, read-only)."""
    cache_dir = Path(cache_dir)
    manifest, recs = _open(cache_dir, "adience")
    rows = tuple(
        Row(
            fold=int(r["fold"]),
            user_id=r["user_id"],
            original_image=r["original_image"],
            face_id=int(r["face_id"]),
            age=r["age"],
            gender=r["gender"],
            source=r["source"],
            raw="",
        )
        for r in recs
    )
    dups = {int(k): int(v) for k, v in manifest["duplicates"].items()}
    images = np.load(cache_dir / IMAGES, mmap_mode="r")
    return Cache(cache_dir, _slots(recs), images, manifest, Table(rows=rows, duplicates=dups))


def open_source_cache(cache_dir: Path | str) -> SourceCache:
    """Open a finished CelebA / UTKFace cache (memory-mapped, read-only)."""
    cache_dir = Path(cache_dir)
    manifest, recs = _open(cache_dir, "source")
    records = tuple(
        FaceRecord(
            path=r["path"],
            age=int(r["age"]),
            gender=int(r["gender"]),
            partition=int(r["partition"]),
            source=r["source"],
        )
        for r in recs
    )
    images = np.load(cache_dir / IMAGES, mmap_mode="r")
    return SourceCache(
        cache_dir, _slots(recs), images, manifest, records, tuple(manifest["age_classes"])
    )
