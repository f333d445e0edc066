"""The model server's work, apart from HTTP: a request's body in, `AgageGenderModel`'s rows out,
with every limit and the request's deadline kept, and faces of concurrent requests sharing one
forward pass.

A request takes a decode slot (`decode_workers` at once: parsing and decoding hold the memory),
is parsed and checked (`tracking.serving`), has its photos' pixels counted from their headers
before any is decoded, is decoded and its faces found, then leaves the slot and queues its faces
for the batcher thread, which runs one `Predictor.probabilities` over the faces of every request
waiting (up to `max_batch`; when other requests are still decoding it waits up to
`batch_window_ms` for theirs, when idle not at all). Each queued face carries its request's
deadline: none is decoded or forwarded after it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import ctypes.util
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agegender.detect import FaceDetector
from agegender.predict import Photo, Predictor
from serving.settings import ServeSettings
from tracking.serving import PhotoInput, RequestError, parse_request, photo_inputs, served_rows

TRIM_PIXELS = 4_000_000  # a decode this big gives its freed memory back (malloc_trim)
BIG_BODY_BYTES = 1 << 20  # a body this big leaves parsed objects worth a trim when idle
ARENAS = 2  # glibc malloc arenas (M_ARENA_MAX)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc
    _LIBC = None


def _few_arenas() -> None:
    """glibc gives each thread that allocates its own arena (up to 8 a core), each keeping its
    own freed memory: with two the hostile battery's 2,000 mixed requests ended at 1.090 x warm,
    with the default 1.119. (A fixed 1 MiB mmap threshold reached 1.052 but cost 5-10 % of the
    throughput: every forward pass faulted its activations in afresh.)"""
    if _LIBC is not None:
        _LIBC.mallopt(-8, ARENAS)  # M_ARENA_MAX


Probs = dict[str, npt.NDArray[np.float32]]
EMA = 0.2  # weight of the newest measurement in the moving averages


class Refused(Exception):
    """A request not answered: its HTTP status, a metrics label, our words, and when to retry."""

    def __init__(
        self, status: int, kind: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


@dataclass
class Answer:
    rows: list[dict[str, Any]]
    photos: int
    faces: int
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class _Item:
    """One request's faces waiting for a forward pass."""

    images: npt.NDArray[np.uint8]
    oversample: bool
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    probs: Probs | None = None
    refused: Refused | None = None


class Engine:
    """Thread-safe: `answer` is called from many threads at once (the app's `to_thread`)."""

    def __init__(
        self, predictor: Predictor, settings: ServeSettings, input_schema: Any | None = None
    ) -> None:
        if input_schema is None:  # still "missing inputs ['image']" for a request without it
            from tracking.serving import signature

            input_schema = signature(list(predictor.labels)).inputs
        self.predictor, self.settings, self.input_schema = predictor, settings, input_schema
        self.detector = FaceDetector()
        self.ready = False
        # what the tests and metrics count: requests decoded, photos decoded, forward passes...
        self.counts: collections.Counter[str] = collections.Counter()
        self._slots = threading.BoundedSemaphore(settings.decode_workers)
        # photos are decoded on `decode_workers` threads in all: one request alone uses them all
        # (as `agegender predict` does), several never hold more decoded photos than that
        self._decoders = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self._lock = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._waiting = 0  # requests waiting for a decode slot
        self._in_flight = 0  # requests between arrival and answer
        self._decode_s = 0.0  # seconds a request holds a decode slot (moving average)
        self._face_s = 0.0  # seconds of forward pass per face (moving average)
        self._closed = False
        self._pixels_decoding = 0  # pixels of the photos being decoded now, over all requests
        self._trim_due = False  # a request since the last idle trim had a big body
        _few_arenas()
        self._thread = threading.Thread(target=self._batcher, name="batcher", daemon=True)
        self._thread.start()

    # -- what the app asks -------------------------------------------------------------------

    def queue_depth(self) -> int:
        with self._lock:
            return sum(len(i.images) for i in self._queue) + self._waiting

    def expected_wait(self) -> float:
        """Seconds before a request arriving now would start: the requests ahead of it for a
        decode slot and the faces ahead of it for the net, times their measured costs."""
        with self._lock:
            faces = sum(len(i.images) for i in self._queue)
            return (
                self._waiting / self.settings.decode_workers * self._decode_s + faces * self._face_s
            )

    def warm_up(self) -> None:
        """One whole prediction (a photo through detection, one through the batcher), so the
        first user waits for no lazy initialisation; `ready` only after it."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, format="PNG")
        photo = base64.b64encode(buf.getvalue()).decode()
        body = json.dumps(
            {
                "dataframe_records": [
                    {"image": photo, "detect": True},
                    {"image": photo, "detect": False},
                ]
            }
        ).encode()
        self.answer(
            body, "application/json", time.monotonic() + max(60.0, self.settings.deadline_s)
        )
        self.ready = True

    def answer(self, body: bytes, content_type: str, deadline: float) -> Answer:
        """The request's rows, or Refused. Blocking; `deadline` is a `time.monotonic()` value."""
        with self._lock:
            self._in_flight += 1
            # a big body leaves parsed objects in the heaps; an ordinary request leaves nothing
            # worth a trim (1.2 ms, and the pages it hands back fault in again on the next pass)
            self._trim_due |= len(body) >= BIG_BODY_BYTES
        try:
            photos = self._decoded(body, content_type, deadline)
            return self._predicted(photos, deadline)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
                trim, self._trim_due = (
                    (True, False)
                    if self._in_flight == 0 and self._trim_due
                    else (False, self._trim_due)
                )
            if trim and _LIBC is not None:  # what the requests freed, back to the system
                _LIBC.malloc_trim(0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for item in self._queue:
                item.refused = Refused(503, "closing", "the server is shutting down")
                item.done.set()
            self._queue.clear()
            self._lock.notify_all()
        self._thread.join(timeout=10)
        self._decoders.shutdown(wait=False, cancel_futures=True)

    # -- a request's steps ---------------------------------------------------------------------

    def _busy(self, status: int, kind: str, message: str) -> Refused:
        return Refused(status, kind, message, retry_after=max(1.0, round(self.expected_wait(), 1)))

    def admit(self, deadline: float) -> None:
        """Refused (503 + Retry-After) if the queue says a request would not start before its
        deadline: the app asks before reading the body, `answer` again once it is read."""
        wait = self.expected_wait()
        if time.monotonic() + wait > deadline:
            self.counts["refused_at_arrival"] += 1
            raise self._busy(
                503,
                "busy",
                f"the server is busy: about {wait:.1f} s of work queued, past the deadline",
            )

    def _decoded(self, body: bytes, content_type: str, deadline: float) -> list[Photo]:
        """Parse, check and decode in a slot; refused at once if the queue says it would not
        start before its deadline."""
        self.admit(deadline)
        with self._lock:
            self._waiting += 1
        try:
            got = self._slots.acquire(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._waiting -= 1
        if not got:
            self.counts["refused_in_queue"] += 1
            raise self._busy(503, "busy", "the server is busy: no decode slot before the deadline")
        start = time.monotonic()
        try:
            photos = self._decode(body, content_type, deadline)
        finally:
            self._slots.release()
        seconds = time.monotonic() - start
        with self._lock:
            self._decode_s = _average(self._decode_s, seconds)
        return photos

    def _decode(self, body: bytes, content_type: str, deadline: float) -> list[Photo]:
        s = self.settings
        try:
            model_input = parse_request(body, content_type, self.input_schema)
            if len(model_input) > s.max_photos:  # rows of a DataFrame, photos of a dict's column
                raise RequestError(
                    f"{len(model_input)} photos in one request, over the limit of {s.max_photos}",
                    413,
                    "too_many_photos",
                )
            checked = photo_inputs(model_input, s.detect, s.float_range)
        except RequestError as exc:
            raise Refused(exc.status, exc.kind, exc.message) from None
        if len(checked) > s.max_photos:
            raise Refused(
                413,
                "too_many_photos",
                f"{len(checked)} photos in one request, over the limit of {s.max_photos}",
            )
        self.counts["header_checks"] += len(checked)
        sizes = [p.pixels(s.max_photo_pixels) for p in checked]
        total = sum(sizes)
        if total > s.max_request_pixels:
            raise Refused(
                413,
                "too_many_pixels",
                f"{total:,} pixels in one request, over the limit of {s.max_request_pixels:,}",
            )
        return list(self._decoders.map(self._prepare, checked, sizes, [deadline] * len(sizes)))

    def _prepare(self, p: PhotoInput, pixels: int, deadline: float) -> Photo:
        if time.monotonic() > deadline:
            raise self._busy(504, "deadline", "the request's deadline passed while decoding")
        if p.data is not None or p.array is not None:
            with self._lock:
                self.counts["decodes"] += 1
        detector = self.detector if p.detect else None
        with self._decoding(pixels, deadline):
            return p.prepare(self.predictor.image_size, detector, self.settings.max_photo_pixels)

    @contextlib.contextmanager
    def _decoding(self, pixels: int, deadline: float) -> Iterator[None]:
        """Pixels decoded at once over all requests stay within `max_decode_pixels` (a decode
        peaks near 10 bytes a pixel: six 49 MP PNGs one after another +469 MiB; before the decode
        stopped copying the image twice, 17 and +840 MiB, two at once +1.6 GiB); memory
        a big decode freed in a thread's malloc arena is handed back to the system (glibc
        keeps it otherwise: +544 MiB after two 49 MP decodes, 9 after malloc_trim)."""
        take = min(pixels, self.settings.max_decode_pixels)
        with self._lock:
            while self._pixels_decoding + take > self.settings.max_decode_pixels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._busy(
                        503, "busy", "the server is busy: no decode slot before the deadline"
                    )
                self._lock.wait(left)
            self._pixels_decoding += take
        try:
            yield
        finally:
            with self._lock:
                self._pixels_decoding -= take
                self._lock.notify_all()
            if pixels >= TRIM_PIXELS and _LIBC is not None:
                _LIBC.malloc_trim(0)

    def _predicted(self, photos: list[Photo], deadline: float) -> Answer:
        def forward(images: npt.NDArray[np.uint8], oversample: bool) -> Probs:
            return self._forward(images, oversample, deadline)

        rows = list(
            served_rows(
                self.predictor, photos, self.settings.oversample, self.settings.max_batch, forward
            )
        )
        errors = collections.Counter(
            _error_kind(r["error"]) for r in rows if r["status"] == "error"
        )
        faces = sum(r["face"] is not None for r in rows)
        return Answer(rows, len(photos), faces, errors)

    def _forward(self, images: npt.NDArray[np.uint8], oversample: bool, deadline: float) -> Probs:
        """The faces' probabilities from the batcher's pass (blocking)."""
        item = _Item(images, oversample, deadline)
        with self._lock:
            if self._closed:
                raise Refused(503, "closing", "the server is shutting down")
            self._queue.append(item)
            self._lock.notify_all()
        item.done.wait()
        if item.refused is not None:
            raise item.refused
        assert item.probs is not None
        return item.probs

    # -- the batcher thread --------------------------------------------------------------------

    def _take(self) -> list[_Item] | None:
        """The items of the next pass: wait for the first, then up to `batch_window_ms` for
        other requests in flight (none when only those queued are), at most `max_batch` faces."""
        s = self.settings
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            end = time.monotonic() + s.batch_window_ms / 1000
            while (
                self._in_flight > len(self._queue)
                and sum(len(i.images) for i in self._queue) < s.max_batch
                and (left := end - time.monotonic()) > 0
            ):
                self._lock.wait(left)
            taken: list[_Item] = []
            faces = 0
            while self._queue and (not taken or faces + len(self._queue[0].images) <= s.max_batch):
                item = self._queue.popleft()
                taken.append(item)
                faces += len(item.images)
            return taken

    def _batcher(self) -> None:
        while (taken := self._take()) is not None:
            with self._lock:  # a pass cannot stop: one that would end past a deadline is not run
                ends = time.monotonic() + self._face_s * sum(len(i.images) for i in taken)
            live = []
            for item in taken:
                if ends > item.deadline:
                    self.counts["dropped"] += 1
                    item.refused = self._busy(
                        504,
                        "deadline",
                        "the request's deadline would pass before its forward pass ends",
                    )
                    item.done.set()
                else:
                    live.append(item)
            if live:
                self._run(live)

    def _run(self, items: list[_Item]) -> None:
        start = time.monotonic()
        try:
            probs = self.predictor.probabilities(
                np.concatenate([i.images for i in items]), items[0].oversample
            )
        except Exception as exc:  # a failed pass fails its requests, never the thread
            for item in items:
                item.refused = Refused(
                    500, "internal", f"the forward pass failed ({type(exc).__name__})"
                )
                item.done.set()
            return
        faces = sum(len(i.images) for i in items)
        self.counts["passes"] += 1
        self.counts["faces_forwarded"] += faces
        per_face = (time.monotonic() - start) / faces
        with self._lock:
            self._face_s = _average(self._face_s, per_face)
        k = 0
        for item in items:
            n = len(item.images)
            item.probs = {h: p[k : k + n] for h, p in probs.items()}
            k += n
            item.done.set()


def _error_kind(error: str | None) -> str:
    """A short label of a photo's error for the metrics (its words stay in the row)."""
    text = error or ""
    for prefix, kind in (
        ("not base64", "not_base64"),
        ("not an image", "not_an_image"),
        ("cannot decode", "corrupt"),
        ("too many pixels", "too_many_pixels"),
        ("32-bit", "unsupported_mode"),
    ):
        if text.startswith(prefix):
            return kind
    return "too_many_pixels" if "over the limit" in text else "other"


def _average(mean: float, new: float) -> float:
    """A moving average that starts at its first measurement."""
    return new if not mean else (1 - EMA) * mean + EMA * new
