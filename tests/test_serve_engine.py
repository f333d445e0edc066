"""The model server's engine in-process (`serving.engine`): every input checked in our words,
limits kept before any decode, deadlines kept, and faces of concurrent requests sharing one
forward pass, with the rows `agegender predict` gives. Counters, not clocks, show what ran."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender.config import load_config
from agegender.detect import FaceDetector
from agegender.predict import Predictor, predict_paths
from agegender.train import train_fold
from serving.engine import Engine, Refused
from serving.settings import ServeSettings

SMALL = ["data.crop=48", "optim.name=adam", "model.norm=batchnorm", "train.iterations=2"]
SMALL += ["train.patience=null", "train.tencrop=false"]
JSON = "application/json"


@pytest.fixture(scope="module")
def predictor(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    out = tmp_path_factory.mktemp("engine-model") / "run"
    best = train_fold(tiny_cache, 0, load_config(None, SMALL), out).out_dir / "best.pt"
    return Predictor.load(best, "cpu")


def _engine(predictor: Predictor, **settings: Any) -> Engine:
    engine = Engine(predictor, ServeSettings(model="unused", **settings))
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def engine(predictor: Predictor) -> Iterator[Engine]:
    engine = _engine(predictor)
    yield engine
    engine.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _ask(engine: Engine, payload: Any, content_type: str = JSON, seconds: float = 120) -> Any:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return engine.answer(body, content_type, time.monotonic() + seconds)


def _refusal(engine: Engine, payload: Any, content_type: str = JSON) -> tuple[int, str, str]:
    with pytest.raises(Refused) as info:
        _ask(engine, payload, content_type)
    return info.value.status, info.value.kind, info.value.message


def test_bad_requests_are_refused_in_our_words(engine: Engine) -> None:
    """Each bad input gets one specific message naming the photo, before any photo is decoded."""
    grey = np.full((4, 4, 3), 0.5).tolist()
    records = "dataframe_records"
    cases: list[tuple[Any, str, tuple[int, str, str]]] = [
        (b'{"dataframe_records": [{"image": x', JSON, (400, "bad_request",
            "the body is not valid JSON (line 1, column 34: Expecting value)")),
        (b"\xff\xfe{}", JSON, (400, "bad_request", "the body is not UTF-8 (byte 0)")),
        (b"[1, 2]", JSON, (400, "bad_request", "expected a JSON object with one of "
            "dataframe_records, dataframe_split, inputs, instances, got a JSON list")),
        ({records: [], "images": []}, JSON, (400, "bad_request", "unknown key(s) 'images': "
            "expected one of dataframe_records, dataframe_split, inputs, instances")),
        ({records: [{"picture": "x"}]}, JSON, (400, "bad_request", "Model is missing inputs "
            "['image']. Note that there were extra inputs: ['picture'].")),
        ({records: [{"image": "x"}, {"image": "x", "detect": "no"}]}, JSON, (400, "bad_request",
            'photo 1: detect must be true or false (a JSON boolean), got "no"')),
        ({"inputs": {"image": ["x", "x"], "detect": [True, "false"]}}, JSON, (400,
            "bad_request", 'photo 1: detect must be true or false (a JSON boolean), got "false"')),
        ({records: [{"image": "x", "detect": 0}]}, JSON, (400, "bad_request",
            "photo 0: detect must be true or false (a JSON boolean), got 0")),
        ({"inputs": {"image": [grey]}}, JSON, (400, "bad_request", "photo 0: float pixel values "
            "(0.5 to 0.5) of no declared scale: send integers 0..255 (or serve with float_range "
            "0..1 or 0..255)")),
        (b'{"inputs": {"image": [[[[1, 2, NaN]]]]}}', JSON, (400, "bad_request",
            "photo 0: NaN or infinite pixel values")),
        ({"inputs": {"image": [[[[1, 2, 3]]], [[[1, 2, 3], [4, 5, 6]], [[1, 2]]]]}}, JSON, (400,
            "bad_request", "photo 1: expected an H x W x 3 array of numbers, got rows of "
            "different lengths")),
        ({"inputs": {"image": [[[[1, 2, 300]]]]}}, JSON, (400, "bad_request",
            "photo 0: pixel values must be 0..255, got 1 to 300")),
        ({"inputs": {"image": [[[1, 2]]]}}, JSON, (400, "bad_request",
            "photo 0: expected an H x W x 3 array of numbers, got shape (1, 2)")),
        ({records: [{"image": "x"}] * 65}, JSON, (413, "too_many_photos",
            "65 photos in one request, over the limit of 64")),
        ({records: [{"image": "x"}]}, "text/plain", (415, "content_type",
            "Content-Type must be application/json or text/csv (got 'text/plain')")),
        ({records: [{"image": "x"}]}, "", (415, "content_type",
            "Content-Type must be application/json or text/csv (none was sent)")),
    ]  # fmt: skip
    before = engine.counts["decodes"]
    for payload, content_type, expected in cases:
        assert _refusal(engine, payload, content_type) == expected
    assert engine.counts["decodes"] == before
    huge = b'{"dataframe_records": "' + b"A" * 100_000 + b"!"
    status, _, message = _refusal(engine, huge)
    assert (status, message) == (
        400,
        "the body is not valid JSON (line 1, column 23: Unterminated string starting at)",
    )  # never the body

    # photos that cannot be decoded get their row, the rest are answered
    text = _b64(b"hello, not a photo")
    answer = _ask(engine, {records: [{"image": "not base64!"}, {"image": text}]})
    assert [(r["image"], r["status"], r["error"]) for r in answer.rows] == [
        (0, "error", "not base64 (Only base64 data is allowed)"),
        (1, "error", "not an image file (JPEG, PNG, ...)"),
    ]
    assert answer.errors == {"not_base64": 1, "not_an_image": 1}


def test_rows_are_the_cli_rows(
    engine: Engine, predictor: Predictor, photos: dict[str, Any], tmp_path: Path
) -> None:
    """The same photos give `agegender predict`'s rows (its `path` is the request's index), a
    16-bit grey PNG its 8-bit original's, declared floats their uint8 original's."""
    names = ["two.jpg", "none.png", "corrupt.jpg"]
    paths = [str(photos["dir"] / n) for n in names]
    cli = list(predict_paths(predictor, paths, detector=FaceDetector()))
    records = [{"image": _b64(Path(p).read_bytes())} for p in paths]
    answer = _ask(engine, {"dataframe_records": records})
    assert (answer.photos, answer.faces, answer.errors) == (3, 2, {"corrupt": 1})
    assert len(answer.rows) == len(cli) == 4
    for got, want in zip(answer.rows, cli, strict=True):
        assert got["image"] == paths.index(want.pop("path"))
        probs = {k: got.pop(k) for k in ("age_probs", "gender_probs") if k in got}
        for k, v in probs.items():
            np.testing.assert_allclose(list(v.values()), list(want.pop(k).values()), atol=2e-4)
        assert {k: v for k, v in got.items() if k not in ("image", "age_prob", "gender_prob")} == {
            k: v for k, v in want.items() if k not in ("age_prob", "gender_prob")
        }

    # 16-bit grey: the same pixels as the 8-bit grey, not a white photo
    with Image.open(photos["dir"] / "two.jpg") as im:
        grey = np.asarray(im.convert("L"))
    grey8, grey16 = _png(grey), _png(grey.astype(np.uint16) * 257)
    answer = _ask(engine, {"inputs": {"image": [_b64(grey8), _b64(grey16)], "detect": [False] * 2}})
    eight, sixteen = answer.rows
    assert (eight["status"], sixteen["status"]) == ("whole image", "whole image")
    assert sixteen["age_probs"] == eight["age_probs"]

    # floats in a declared range: the same answer as the integers they scale to
    pixels = np.asarray(Image.open(photos["dir"] / "two.jpg").convert("RGB"))[::8, ::8]
    as_int = _ask(engine, {"inputs": {"image": [pixels.tolist()]}}).rows
    unit = _engine(predictor, float_range="0..1")
    try:
        as_float = _ask(unit, {"inputs": {"image": [(pixels / 255).tolist()]}}).rows
        over = _refusal(unit, {"inputs": {"image": [(pixels / 100).tolist()]}})
    finally:
        unit.close()
    assert as_float == as_int
    assert over[2] == "photo 0: float pixel values must be 0..1 (float_range), got 0.09 to 2.55"

    # a photo without `detect` gets the server's default, even beside one that sets it (MLflow's
    # cast of the column would make it True)
    two = _b64((photos["dir"] / "two.jpg").read_bytes())
    off = _engine(predictor, detect=False)
    try:
        rows = _ask(
            off, {"dataframe_records": [{"image": two, "detect": True}, {"image": two}]}
        ).rows
    finally:
        off.close()
    assert [(r["image"], r["status"]) for r in rows] == [
        (0, "face"),
        (0, "face"),
        (1, "whole image"),
    ]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height but holds a few bytes: decoding it would fail as
    truncated, so an 'over the limit' row shows that only its header was read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_pixel_limits_are_kept_before_any_decode(predictor: Predictor) -> None:
    engine = _engine(predictor, max_photo_pixels=50_000, max_request_pixels=60_000)
    try:
        small = _b64(_png(np.zeros((150, 150, 3), np.uint8)))  # 22,500 pixels
        bomb = _b64(_png_header(8000, 6250))  # 50 MP by its header
        before = engine.counts["decodes"]
        answer = _ask(engine, {"dataframe_records": [{"image": bomb}, {"image": small}]})
        assert engine.counts["decodes"] == before + 1  # the small one only
        assert [(r["status"], r["error"]) for r in answer.rows] == [
            ("error", "8000 x 6250 = 50,000,000 pixels, over the limit of 50,000"),
            ("no face", None),
        ]
        assert answer.errors == {"too_many_pixels": 1}
        three = {"inputs": {"image": [small] * 3}}
        assert _refusal(engine, three) == (
            413,
            "too_many_pixels",
            "67,500 pixels in one request, over the limit of 60,000",
        )
        array = {"inputs": {"image": [np.zeros((300, 200, 3), np.uint8).tolist()]}}
        answer = _ask(engine, array)
        assert answer.rows[0]["error"] == "200 x 300 = 60,000 pixels, over the limit of 50,000"
        assert engine.counts["decodes"] == before + 1
    finally:
        engine.close()


def test_concurrent_requests_share_forward_passes(
    predictor: Predictor, photos: dict[str, Any]
) -> None:
    """Four requests at once: their faces go through fewer passes than requests, and each
    request gets its own rows, in order, as when it is alone."""
    engine = _engine(predictor, batch_window_ms=20_000, decode_workers=4)
    two = _b64((photos["dir"] / "two.jpg").read_bytes())
    grey = _b64(_png(np.full((64, 64, 3), 90, np.uint8)))
    requests = [
        {"dataframe_records": [{"image": two}] * (1 + i % 2) + [{"image": grey, "detect": False}]}
        for i in range(4)
    ]
    try:
        alone = [_ask(engine, r).rows for r in requests]
        passes = engine.counts["passes"]
        barrier = threading.Barrier(len(requests))
        together: list[Any] = [None] * len(requests)

        def client(i: int) -> None:
            barrier.wait()
            together[i] = _ask(engine, requests[i]).rows

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shared = engine.counts["passes"] - passes
    finally:
        engine.close()
    assert 1 <= shared < len(requests)
    for got, want in zip(together, alone, strict=True):
        assert [(r["image"], r["face"], r["box"]) for r in got] == [
            (r["image"], r["face"], r["box"]) for r in want
        ]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(
                list(a["age_probs"].values()), list(b["age_probs"].values()), atol=2e-4
            )


def test_a_request_past_its_deadline_does_no_work(predictor: Predictor) -> None:
    """Waiting for a decode slot past the deadline: 503 with Retry-After, nothing decoded or
    forwarded; faces whose deadline would pass before the pass ends are dropped from it."""
    engine = _engine(predictor, decode_workers=1)
    photo = {"dataframe_records": [{"image": _b64(_png(np.zeros((32, 32, 3), np.uint8)))}]}
    try:
        counts = dict(engine.counts)
        with pytest.raises(Refused) as late:
            _ask(engine, photo, seconds=-1)  # already past: refused at arrival
        assert (late.value.status, late.value.kind) == (503, "busy")
        assert engine._slots.acquire(timeout=60)  # a request holds the one slot
        try:
            with pytest.raises(Refused) as queued:
                _ask(engine, photo, seconds=0.3)
            assert engine.queue_depth() == 0
        finally:
            engine._slots.release()
        assert (queued.value.status, queued.value.kind, queued.value.message) == (
            503,
            "busy",
            "the server is busy: no decode slot before the deadline",
        )
        assert queued.value.retry_after == 1.0  # nothing measured queued: the least
        assert engine.counts["refused_in_queue"] == counts.get("refused_in_queue", 0) + 1
        faces = np.zeros((2, predictor.image_size, predictor.image_size, 3), np.uint8)
        with pytest.raises(Refused) as dropped:
            engine._forward(faces, False, time.monotonic() - 1)
        assert (dropped.value.status, dropped.value.kind) == (504, "deadline")
        assert engine.counts["dropped"] == 1
        # a pass cannot be stopped: one measured to end past the deadline does not start
        engine._face_s = 10.0  # seconds a face, as measured on a slow device
        with pytest.raises(Refused) as would_end_late:
            engine._forward(faces, False, time.monotonic() + 5)
        assert would_end_late.value.message == (
            "the request's deadline would pass before its forward pass ends"
        )
        assert engine.counts["dropped"] == 2
        for key in ("decodes", "passes", "faces_forwarded", "header_checks"):
            assert engine.counts[key] == counts[key], key
    finally:
        engine.close()
