"""Opening and decoding image files, the one way the cache (`prepare`), `predict` and the model
server all use: the pixel limit is checked from the header, before any pixel is decoded, and
every mode Pillow opens becomes RGB uint8 with its own scale (Pillow's `convert("RGB")` clips
16-bit greys to 255: a white image).
"""

from __future__ import annotations

from typing import IO

import numpy as np
import numpy.typing as npt
from PIL import Image

MAX_PIXELS = 50_000_000  # a 50 MP photo is plausible; beyond that, a decompression bomb
# 16-bit greys as Pillow opens them: PNG's as I;16*, 16-bit PGM/PPM and TIFF greys as I (int32)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

UInt8 = npt.NDArray[np.uint8]


class ImageRefused(ValueError):
    """A file Pillow opens whose pixels are not decoded: too many, or of no known 8-bit scale."""


def open_image(source: str | IO[bytes], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An opened image whose size was checked before any pixel is decoded (Pillow reads only
    the header here); files Pillow cannot read raise its own errors."""
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"too many pixels ({exc})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageRefused(f"{w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    return im


def to_rgb(im: Image.Image) -> UInt8:
    """H x W x 3 uint8 (writable, as torch.from_numpy wants) of an opened image of any mode.

    16-bit greys keep their high byte (value >> 8, as Pillow already does for 16-bit RGB and
    RGBA PNGs), so an 8-bit image saved x257 gives back its very pixels; 32-bit floats have no
    known scale (0-1? 0-255?) and are refused rather than guessed."""
    if im.mode in SIXTEEN_BIT:
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise ImageRefused(
                f"32-bit integer pixels ({values.min()} to {values.max()}): no known 8-bit "
                "scale; save it with 8 or 16 bits per channel"
            )
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ImageRefused(
            "32-bit float pixels (mode F): no known 8-bit scale; save it with 8 or 16 bits "
            "per channel"
        )
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))  # convert would copy RGB
