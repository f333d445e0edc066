"""What `agegender serve` is told: the model, where it listens, and every limit (each a setting
with a default sized for a small host; the README gives measured advice)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MiB = 1 << 20


class ServeSettings(BaseModel):
    """One server process. Limits are checked before the work they bound: bytes before the body
    is read, pixels from each photo's header before any photo is decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a model folder"
    )
    run_root: str = Field("runs/suite", description="the suite's, when no MLflow server is set")
    host: str = Field("127.0.0.1", description="beyond loopback only with credentials")
    port: int = Field(5001, ge=1, le=65535)
    allowed_hosts: tuple[str, ...] = Field(
        (), description="Host header names accepted besides the listen address and loopback"
    )
    device: str = "auto"
    detect: bool = Field(True, description="face detection for photos that do not say")
    oversample: bool = Field(False, description="10-crop averaging instead of the centre crop")
    float_range: Literal["refuse", "0..1", "0..255"] = Field(
        "refuse", description="how float pixel arrays are read; refused unless declared"
    )
    max_request_bytes: int = Field(32 * MiB, gt=0, description="413 beyond, before reading")
    max_body_bytes_in_flight: int = Field(
        128 * MiB, gt=0, description="bodies held at once; 503 while a new one does not fit"
    )
    max_photos: int = Field(64, gt=0, description="photos per request")
    max_photo_pixels: int = Field(50_000_000, gt=0, description="per photo, from its header")
    max_request_pixels: int = Field(100_000_000, gt=0, description="all photos of a request")
    decode_workers: int = Field(
        default_factory=lambda: min(32, os.cpu_count() or 1),
        gt=0,
        description="requests parsed and decoded at once (as `agegender predict`: the CPUs, <= 32)",
    )
    max_decode_pixels: int = Field(
        50_000_000, gt=0, description="pixels decoded at once over all requests (~10 B each)"
    )
    deadline_s: float = Field(30.0, gt=0, description="a request's time from arrival to answer")
    upload_timeout_s: float = Field(10.0, gt=0, description="408 if the body is not in by then")
    batch_window_ms: float = Field(
        5.0, ge=0, description="how long a forward pass waits for faces of other requests"
    )
    max_batch: int = Field(64, gt=0, description="faces per forward pass")
