"""The MLflow pyfunc flavour of a trained model: `mlflow models serve` answers JSON requests.

The model folder holds the checkpoint (`artifacts/best.pt`, which carries the input size, the
normalisation statistics and the label names) and a copy of the `agegender` code, so nothing
else is needed to use it. A request is a batch of photos, each a base64-encoded image file (a
JPEG, PNG, ...) or a uint8 H x W x 3 array:

    {"dataframe_records": [{"image": "<base64>"}, {"image": "<base64>", "detect": false}]}
    {"inputs": {"image": ["<base64>", ...]}}
    {"inputs": {"image": [[[[r, g, b], ...], ...], ...]}}       (arrays: one H x W x 3 per photo)

The answer has a row per face found (`image` is the photo's index in the request): box, age
group and its probability, all age probabilities, gender and its probability; a photo with no
face, or one that cannot be decoded, gets a row saying so.

The logged model's signature (`signature`: an `image` column, any type, and an optional boolean
`detect`; the answer's columns) is what MLflow checks a request against before the model sees
it, so a request without an `image` column gets MLflow's "missing inputs ['image']" answer and a
bare array must be sent as `{"inputs": {"image": ...}}`. `input_example` is the request the UI
shows.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]
from mlflow.pyfunc.model import PythonModel

from agegender.detect import FaceDetector
from agegender.images import MAX_PIXELS, ImageRefused, open_image
from agegender.predict import Photo, Predictor, predict_photos, prepare_array, prepare_bytes

FloatRange = Literal["refuse", "0..1", "0..255"]
FORMATS = ("dataframe_records", "dataframe_split", "inputs", "instances")


class RequestError(ValueError):
    """A request refused as a whole, in our words (never the body's), with its HTTP status."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind


@dataclass
class PhotoInput:
    """One checked photo of a request: encoded bytes or a uint8 array, or why neither."""

    index: int
    detect: bool
    data: bytes | None = None
    array: npt.NDArray[np.uint8] | None = None
    error: str | None = None

    def pixels(self, max_pixels: int) -> int:
        """Its pixel count from the header or the shape, nothing decoded (0: no photo); a
        photo over `max_pixels` gets its error here."""
        if self.array is not None:
            count = int(self.array.shape[0] * self.array.shape[1])
            if count > max_pixels:
                h, w = self.array.shape[:2]
                self.error = f"{w} x {h} = {count:,} pixels, over the limit of {max_pixels:,}"
                self.array = None
                return 0
            return count
        if self.data is None:
            return 0
        try:
            with open_image(io.BytesIO(self.data), max_pixels) as im:
                return int(im.size[0] * im.size[1])
        except ImageRefused as exc:
            self.error, self.data = str(exc), None
        except (OSError, SyntaxError, ValueError):
            pass  # not an image: `prepare_bytes` words it when it tries
        return 0

    def prepare(self, size: int, detector: FaceDetector | None, max_pixels: int) -> Photo:
        name = str(self.index)
        if self.array is not None:
            return prepare_array(name, self.array, size, detector)
        if self.data is not None:
            return prepare_bytes(name, self.data, size, detector, max_pixels)
        return Photo(name, status="error", error=self.error)


class AgeGenderModel(PythonModel):
    """Face detection (on by default, `detect` per photo) and the net, as in `agegender predict`."""

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.predictor = Predictor.load(
            context.artifacts["checkpoint"], config.get("device", "auto")
        )
        self.detector = FaceDetector()
        self.detect = bool(config.get("detect", True))
        self.oversample = bool(config.get("oversample", False))
        self.float_range: FloatRange = config.get("float_range", "refuse")

    # A DataFrame: MLflow casts every request to the signature's columns first. (MLflow reads
    # the hint; `Any` made it warn, and a DataFrame hint adds no checks of its own.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: Any = None
    ) -> list[dict[str, Any]]:
        size = self.predictor.image_size
        checked = photo_inputs(model_input, self.detect, self.float_range)
        photos = (p.prepare(size, self.detector if p.detect else None, MAX_PIXELS) for p in checked)
        return list(served_rows(self.predictor, photos, self.oversample))


def served_rows(
    predictor: Predictor,
    photos: Iterable[Photo],
    oversample: bool,
    batch_size: int = 64,
    probabilities: Any = None,
) -> Iterator[dict[str, Any]]:
    """The CLI's rows with `image` (the photo's index in the request) instead of `path`."""
    for row in predict_photos(predictor, photos, oversample, batch_size, None, probabilities):
        row["image"] = int(row.pop("path"))
        yield row


def parse_request(body: bytes, content_type: str | None, input_schema: Any) -> Any:
    """A request body as MLflow's scoring server parses it (its four JSON formats or CSV, then
    the model's input schema), every error in our words: no traceback, no echo of the body."""
    from mlflow.exceptions import MlflowException
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc.scoring_server import infer_and_parse_data, parse_csv_input

    mime, _, params = (content_type or "").partition(";")
    mime = mime.strip().lower()
    for param in filter(None, (x.strip() for x in params.split(";"))):
        key, _, value = param.partition("=")
        if key.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            raise RequestError(
                f"unsupported Content-Type parameter {param[:40]!r}: only charset=utf-8",
                415,
                "content_type",
            )
    if mime not in ("application/json", "text/csv"):
        got = f"got {mime[:60]!r}" if mime else "none was sent"
        raise RequestError(
            f"Content-Type must be application/json or text/csv ({got})", 415, "content_type"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        flags = None
        if mime == "text/csv":
            data = parse_csv_input(io.StringIO(text))
        else:
            payload = _json_request(text)
            flags = _raw_detects(next(v for k, v in payload.items() if k in FORMATS))
            data = infer_and_parse_data(payload, input_schema)
        parsed = data if input_schema is None else _enforce_schema(data, input_schema)
        if (
            flags is not None
            and isinstance(parsed, pd.DataFrame)
            and "detect" in parsed.columns
            and len(flags) == len(parsed)
        ):  # the cast made an absent flag True: the server's default decides, as the README says
            parsed["detect"] = pd.Series(flags, index=parsed.index, dtype=object)
        return parsed
    except RequestError:
        raise
    except MlflowException as exc:
        message = exc.message.split("\n")[0]
        if (
            "missing inputs" in message
        ):  # MLflow's words, which clients of `mlflow models serve` know
            raise RequestError(message[:200]) from None
        raise RequestError(f"the request does not fit the model's input: {message[:200]}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise RequestError(
            f"the request does not fit the model's input ({type(exc).__name__})"
        ) from None


def _json_request(text: str) -> dict[str, Any]:
    """The JSON object of a request, with one format key and `detect` values checked before
    MLflow's parsing casts them ("no" would become True)."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"the body is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            f"expected a JSON object with one of {', '.join(FORMATS)}, "
            f"got a JSON {type(payload).__name__}"
        )
    keys = [k for k in payload if k in FORMATS]
    unknown = sorted(k for k in payload if k not in FORMATS and k != "params")
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise RequestError(f"unknown key(s) {names}: expected one of {', '.join(FORMATS)}")
    if len(keys) != 1:
        got = ", ".join(keys) or "none"
        raise RequestError(f"expected exactly one of {', '.join(FORMATS)}, got {got}")
    for i, flag in enumerate(_raw_detects(payload[keys[0]])):
        _detect(i, flag, True)
    data = payload[keys[0]]
    if keys[0] in ("inputs", "instances") and isinstance(data, dict) and "image" in data:
        # columns as records: under an `Any` column MLflow 3.17 makes a list of photos one row
        images = data["image"] if isinstance(data["image"], list) else [data["image"]]
        flags = data.get("detect")
        flags = flags if isinstance(flags, list) else [flags] * len(images)
        if len(flags) != len(images):
            raise RequestError(
                f"{len(images)} images but {len(flags)} detect values: send one per image"
            )
        rows = [
            {"image": im} if f is None else {"image": im, "detect": f}
            for im, f in zip(images, flags, strict=True)
        ]
        extra = {k: v for k, v in data.items() if k not in ("image", "detect")}
        if extra:  # the schema check names them
            rows = [r | extra for r in rows]
        return {"dataframe_records": rows}
    return payload


def _raw_detects(data: Any) -> list[Any]:
    """Each photo's `detect` as sent, in any of the four formats."""
    if isinstance(data, dict) and "columns" in data and "data" in data:  # dataframe_split
        columns, rows = data["columns"], data["data"]
        if isinstance(columns, list) and "detect" in columns and isinstance(rows, list):
            k = columns.index("detect")
            return [r[k] if isinstance(r, list) and len(r) > k else None for r in rows]
        return []
    if isinstance(data, dict):  # inputs / instances as columns
        flags = data.get("detect")
        return flags if isinstance(flags, list) else [flags]
    if isinstance(data, list):  # records
        return [r.get("detect") if isinstance(r, dict) else None for r in data]
    return []


def _detect(i: int, flag: Any, default: bool) -> bool:
    if flag is None or (isinstance(flag, float) and flag != flag):  # absent, or NaN in a column
        return default
    if isinstance(flag, bool | np.bool_):
        return bool(flag)
    shown = json.dumps(flag)[:40] if isinstance(flag, str | int | float) else type(flag).__name__
    raise RequestError(f"photo {i}: detect must be true or false (a JSON boolean), got {shown}")


def photo_inputs(model_input: Any, detect: bool, float_range: FloatRange) -> list[PhotoInput]:
    """The request's photos checked, the one place both our server and the logged pyfunc do it:
    base64 decoded (an error row if it is not), arrays as uint8 H x W x 3 (floats only if
    `float_range` declares their scale; NaN, infinities, values out of range and ragged rows
    refused with RequestError naming the photo)."""
    out = []
    for i, (image, flag) in enumerate(_inputs(model_input)):
        photo = PhotoInput(i, _detect(i, flag, detect))
        if isinstance(image, bytes):
            photo.data = image
        elif isinstance(image, str):
            try:
                photo.data = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError) as exc:
                photo.error = f"not base64 ({exc})"
        else:
            photo.array = _uint8(i, image, float_range)
        out.append(photo)
    return out


def _inputs(model_input: Any) -> Iterator[tuple[Any, Any]]:
    """(image, detect as sent) pairs from whatever the scoring server parsed the request into
    (a DataFrame under the signature; models logged before it got the parsed JSON as it was)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise RequestError(f"expected a column 'image', got {list(model_input.columns)[:10]}")
        flags = (
            model_input["detect"] if "detect" in model_input.columns else [None] * len(model_input)
        )
        yield from zip(model_input["image"], flags, strict=True)
        return
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise RequestError(f"expected the key 'image', got {sorted(model_input)[:10]}")
        model_input = model_input["image"]
    if isinstance(model_input, str | bytes):
        yield model_input, None
        return
    array = np.asarray(model_input) if not isinstance(model_input, list) else None
    if array is not None and array.dtype.kind in "uifb":
        if array.ndim == 3:
            yield array, None
            return
        if array.ndim == 4:
            yield from ((a, None) for a in array)
            return
        raise RequestError(f"expected an H x W x 3 or N x H x W x 3 array, got shape {array.shape}")
    yield from ((item, None) for item in model_input)


def _uint8(i: int, image: Any, float_range: FloatRange) -> npt.NDArray[np.uint8]:
    """A photo sent as numbers, as uint8 H x W x 3, or a RequestError naming what was wrong."""
    expected = f"photo {i}: expected an H x W x 3 array of numbers"
    try:
        array = np.asarray(image)
    except (ValueError, TypeError):
        raise RequestError(f"{expected}, got rows of different lengths") from None
    if array.dtype.kind not in "uif":
        what = {
            "b": "true/false values",
            "U": "text",
            "S": "text",
            "O": "nested lists of different lengths or mixed types",
        }.get(array.dtype.kind, str(array.dtype))
        raise RequestError(f"{expected}, got {what}")
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise RequestError(f"{expected}, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise RequestError(f"photo {i}: NaN or infinite pixel values")
        low, high = float(array.min()), float(array.max())
        if float_range == "refuse":
            raise RequestError(
                f"photo {i}: float pixel values ({low:g} to {high:g}) of no declared scale: send "
                "integers 0..255 (or serve with float_range 0..1 or 0..255)"
            )
        top = 1.0 if float_range == "0..1" else 255.0
        if low < 0 or high > top:
            raise RequestError(
                f"photo {i}: float pixel values must be 0..{top:g} (float_range), "
                f"got {low:g} to {high:g}"
            )
        return np.rint(array * (255.0 / top)).astype(np.uint8)
    low_i, high_i = int(array.min()), int(array.max())
    if low_i < 0 or high_i > 255:
        raise RequestError(f"photo {i}: pixel values must be 0..255, got {low_i} to {high_i}")
    return array.astype(np.uint8)


def signature(heads: Sequence[str]) -> Any:
    """The request's columns (`image` base64, optional `detect`) and the answer's, for the
    model's heads (`age`, `gender` or both)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Schema, TensorSpec

    # `image` is a base64 string or an H x W x 3 array: MLflow has no union type, hence Any
    inputs = Schema(
        [
            ColSpec(AnyType(), "image"),  # type: ignore[no-untyped-call]
            ColSpec(DataType.boolean, "detect", required=False),
        ]
    )
    columns: list[ColSpec | TensorSpec] = [
        ColSpec(DataType.long, "image"),
        ColSpec(DataType.long, "face", required=False),
        ColSpec(Array(DataType.long), "box", required=False),
        ColSpec(DataType.string, "status"),
        ColSpec(DataType.string, "error", required=False),
    ]
    for head in heads:
        columns += [
            ColSpec(DataType.string, head, required=False),
            ColSpec(DataType.double, f"{head}_prob", required=False),
            ColSpec(Map(DataType.double), f"{head}_probs", required=False),
        ]
    return ModelSignature(inputs=inputs, outputs=Schema(columns))


def input_example() -> Any:
    """A one-photo request (a small grey JPEG, no face detection): what the UI shows."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="JPEG", quality=80)
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()], "detect": [False]})


@dataclass(frozen=True)
class ServedModel:
    """What `agegender serve` serves and says it serves (`GET /model`): the model's folder and
    checkpoint, and where it came from in the registry (None where a local folder has no such
    thing)."""

    folder: Path
    checkpoint: Path
    uri: str
    name: str | None
    version: str | None
    alias: str | None
    run_id: str | None
    config_hash: str | None
    input_schema: Any | None


def served_model(uri: str, run_root: Path, dst: Path) -> ServedModel:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH` (downloaded under `dst`
    through `tracking.store`) or a local model folder (an MLflow model's, or a run folder or
    `best.pt`). The config hash is the run's `config_hash` tag (a fold run's), else the
    checkpoint's own config's. Unknown models and unreachable stores are one ValueError line."""
    from mlflow.exceptions import MlflowException

    from tracking import TrackingError
    from tracking.store import Tracker, store_uri

    name = version = alias = run_id = None
    config_hash: str | None = None
    if uri.startswith(("models:/", "runs:/")):
        store = store_uri(run_root)
        if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
            raise ValueError(
                f"--model {uri}: no MLflow store at {store}; set MLFLOW_TRACKING_URI or "
                "--run-root to the suite's"
            )
        try:
            tracker = Tracker(None, run_root)
            if uri.startswith("models:/"):
                found = tracker.model_version(uri)
                name, version, run_id = found.name, str(found.version), found.run_id
                alias = uri.partition("@")[2] or None
            else:
                run_id = tracker.run_of(uri)
            if run_id:
                config_hash = tracker.get(run_id).tags.get("config_hash")
            folder = tracker.download(uri, dst)
        except MlflowException as exc:
            raise ValueError(f"--model {uri}: {_first_line(exc.message)}") from None
        except TrackingError as exc:
            raise ValueError(f"--model {uri}: {exc}") from None
    else:
        folder = Path(uri)
    checkpoint = _checkpoint(folder)
    if checkpoint is None:
        raise ValueError(
            f"--model {uri}: no best.pt in {folder} (expected an MLflow model folder with "
            "artifacts/best.pt, a run folder or a best.pt)"
        )
    input_schema = None
    if (folder / "MLmodel").is_file():
        from mlflow.models import Model

        info = Model.load(str(folder))
        input_schema = info.get_input_schema()  # type: ignore[no-untyped-call]
        run_id = run_id or info.run_id
    if config_hash is None:
        config_hash = _checkpoint_config_hash(checkpoint)
    return ServedModel(
        folder, checkpoint, uri, name, version, alias, run_id, config_hash, input_schema
    )


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _checkpoint(folder: Path) -> Path | None:
    for candidate in (folder / "artifacts" / "best.pt", folder / "best.pt", folder):
        if candidate.is_file() and candidate.suffix == ".pt":
            return candidate
    return None


def _checkpoint_config_hash(checkpoint: Path) -> str | None:
    from agegender.config import Config
    from agegender.train import load_checkpoint

    try:
        return Config.model_validate(load_checkpoint(checkpoint)["config"]).hash()
    except (KeyError, ValueError, TypeError):
        return None
