"""Where a dataset came from: synthetic data carry a marker that their generator writes first.

Synthetic images must never be set against published real-data numbers. The generators
(`agegender synth`) write `SYNTHETIC.json` into the dataset's root before any image, the cache
copies it into its manifest and its fingerprint, and runs are tagged with it, so every table
made from such data can say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "SYNTHETIC.json"


def mark_synthetic(root: Path, settings: dict[str, Any]) -> None:
    """Written before the images, so even a half-written synthetic set is marked."""
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"generator": "agegender synth", **settings}, sort_keys=True)
    path = root / MARKER
    if not path.is_file() or path.read_text() != text:  # unchanged: keep its mtime
        path.write_text(text)


def synthetic_marker(root: Path) -> dict[str, Any] | None:
    """The marker's content, or None for a real download (no marker)."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"generator": "unknown (unreadable marker)"}
    return data if isinstance(data, dict) else {"generator": "unknown"}
