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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from mlflow.pyfunc.model import PythonModel

from agegender.detect import FaceDetector
from agegender.predict import Photo, Predictor, predict_photos, prepare_array, prepare_bytes


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

    # A DataFrame: MLflow casts every request to the signature's columns first. (MLflow reads
    # the hint; `Any` made it warn, and a DataFrame hint adds no checks of its own.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: Any = None
    ) -> list[dict[str, Any]]:
        photos = list(self._photos(model_input))
        rows = []
        for row in predict_photos(self.predictor, photos, self.oversample):
            row["image"] = int(row.pop("path"))
            rows.append(row)
        return rows

    def _photos(self, model_input: Any) -> Iterator[Photo]:
        size = self.predictor.image_size
        for i, (image, detect) in enumerate(_inputs(model_input, self.detect)):
            detector = self.detector if detect else None
            if isinstance(image, bytes | str):
                try:
                    data = (
                        image
                        if isinstance(image, bytes)
                        else base64.b64decode(image, validate=True)
                    )
                except (binascii.Error, ValueError) as exc:
                    yield Photo(str(i), status="error", error=f"not base64 ({exc})")
                    continue
                yield prepare_bytes(str(i), data, size, detector)
            else:
                try:
                    array = _uint8(image)
                except ValueError as exc:
                    yield Photo(str(i), status="error", error=str(exc))
                    continue
                yield prepare_array(str(i), array, size, detector)


def _inputs(model_input: Any, detect: bool) -> Iterator[tuple[Any, bool]]:
    """(image, detect) pairs from whatever the scoring server parsed the request into (a
    DataFrame under the signature; models logged before it got the parsed JSON as it was)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"expected a column 'image', got {list(model_input.columns)}")
        flags = (
            model_input["detect"]
            if "detect" in model_input.columns
            else [detect] * len(model_input)
        )
        for image, flag in zip(model_input["image"], flags, strict=True):
            yield image, detect if flag is None or flag != flag else bool(flag)  # NaN: default
        return
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise ValueError(f"expected the key 'image', got {sorted(model_input)}")
        model_input = model_input["image"]
    if isinstance(model_input, str | bytes):
        yield model_input, detect
        return
    array = np.asarray(model_input) if not isinstance(model_input, list) else None
    if array is not None and array.dtype.kind in "uif":
        if array.ndim == 3:
            yield array, detect
            return
        if array.ndim == 4:
            yield from ((a, detect) for a in array)
            return
        raise ValueError(f"expected an H x W x 3 or N x H x W x 3 array, got shape {array.shape}")
    yield from ((item, detect) for item in model_input)


def _uint8(image: Any) -> np.ndarray[Any, np.dtype[np.uint8]]:
    array = np.asarray(image)
    if array.dtype.kind not in "uif" or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 array of 0..255, got {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"pixel values must be 0..255, got {array.min()}..{array.max()}")
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
