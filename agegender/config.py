"""Configuration as validated pydantic models, so a bad value fails early with the key's name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agegender.labels import AgePolicy

Protocol = Literal["subject_disjoint", "levi_hassner"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    """How one fold is divided into train / validation / test."""

    protocol: Protocol = "subject_disjoint"
    age_policy: AgePolicy = "strict"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of training users held out")
    seed: int = Field(0, ge=0)
    lists: Path | None = Field(None, description="Levi-Hassner list dir (levi_hassner protocol)")

    @model_validator(mode="after")
    def _lists_for_levi_hassner(self) -> SplitConfig:
        if self.protocol == "levi_hassner" and self.lists is None:
            raise ValueError("protocol 'levi_hassner' needs `lists` (the test_fold_is_K directory)")
        return self


class CacheConfig(_Strict):
    """How images are decoded into the cache (all but `workers` go into the fingerprint)."""

    image_size: int = Field(256, ge=8, le=1024, description="side of the square cached image")
    draft: bool = Field(True, description="let the JPEG decoder downscale before the resize")
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per CPU core")
