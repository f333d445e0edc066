"""A suite's wall time against the sum of its folds' training: how well folds at once share a
device, read from a finished suite's run root (each fold's `result.json` and `history.json`).

    python benchmarks/suite_wall.py RUN_ROOT [STEPS_JSONL] [OUT_JSON]

A fold's training time is its epochs' images over their images/s (validation, testing and
set-up left out); the suite's wall time is the `suite` step's in `device_check.sh`'s
steps.jsonl (the whole command: start-up, the Prefect server, logging), when given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def fold_training_seconds(fold: Path) -> tuple[float, dict[str, Any]]:
    result = json.loads((fold / "result.json").read_text())
    history = json.loads((fold / "history.json").read_text())
    batch = json.loads((fold / "config.json").read_text())["config"]["data"]["batch_size"]
    seconds, done = 0.0, 0
    for epoch in history:
        images = min(result["sizes"]["train"], (epoch["iteration"] - done) * batch)
        seconds, done = seconds + images / epoch["images_per_s"], epoch["iteration"]
    return seconds, result


def main() -> None:
    root = Path(sys.argv[1])
    wall = None
    if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
        steps = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line]
        wall = next((s["seconds"] for s in reversed(steps) if s["step"] == "suite"), None)
    rows = []
    for result in sorted(root.glob("*/*/fold*/result.json")):
        train_s, r = fold_training_seconds(result.parent)
        rows.append(
            {
                "run": str(result.parent.relative_to(root)),
                "device": r["device"],
                "step": r.get("step"),
                "precision": r.get("precision"),
                "iterations": r["iterations"],
                "train_seconds": train_s,
                "seconds": r["seconds"],
            }
        )
        print(
            f"{rows[-1]['run']}: {r['device']}, {r.get('step')}, {r['iterations']} iterations, "
            f"training {train_s:.1f} s of {r['seconds']:.1f} s"
        )
    total = sum(r["train_seconds"] for r in rows)
    line = f"{len(rows)} folds, their training {total:.1f} s together"
    if wall:
        line += f"; the suite's wall time {wall} s (ratio {total / wall:.2f})"
    print(line)
    if len(sys.argv) > 3:
        out = {"folds": rows, "training_sum_s": total, "suite_wall_s": wall}
        Path(sys.argv[3]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
