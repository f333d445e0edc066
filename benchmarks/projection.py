"""The paper suite's time on this device, from measured rates: training at the best aggregate rate
of `gpu_suite.py`, plus what a fold spends beside training, measured on a fold trained end to end
(`convergence.py`: validation after every epoch, testing with 10 crops, set-up), plus compiling.

    python benchmarks/projection.py --suite gpu_suite.json --folds paper_fp32.json paper_bf16.json

For each precision with both a rate and a fold: training = the paper suite's images (4 variants
x 5 folds + pretraining, 50k iterations of 50) / the best rate over K folds at once; the rest =
training x r / (1 - r), where r is the fold's share of time outside training (conservative: in
the suite one fold validates while others train, and the fold's fixed costs are a smaller share
of 50k iterations than of its own); compiling = the arm's set-up time (compiling the step and
capturing a graph per fold) once for each of the suite's four shapes (three tasks, pretraining).
Prints the table; `--json` writes it. Nothing here is measured: it combines what was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SHAPES = 4  # multitask, age, gender on Adience; multitask on the pretraining source


def project(suite: dict[str, Any], folds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    rows = [r for r in suite["rows"] if "img_per_s" in r]
    for fold in folds:
        precision = fold["precision"]
        mine = [r for r in rows if r["precision"] == precision]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["img_per_s"])
        share = max(0.0, 1 - fold["train_seconds"] / fold["seconds"])
        training = suite["suite_images"] / best["img_per_s"]
        rest = training * share / (1 - share) if share < 1 else float("inf")
        compiling = SHAPES * best["setup_s"] if best["step"] != "eager" else 0.0
        total = training + rest + compiling
        out.append(
            {
                "precision": precision,
                "step": best["step"],
                "folds_at_once": best["folds"],
                "img_per_s": best["img_per_s"],
                "training_min": training / 60,
                "beside_training_share": share,
                "beside_training_min": rest / 60,
                "compiling_min": compiling / 60,
                "total_min": total / 60,
                "fold_test": fold["test"],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", type=Path, required=True, help="gpu_suite.py --json output")
    ap.add_argument("--folds", type=Path, nargs="+", required=True, help="convergence.py --json")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    suite = json.loads(a.suite.read_text())
    folds = [run for f in a.folds for run in json.loads(f.read_text())["runs"][:1]]
    rows = project(suite, folds)
    print(f"paper suite ({suite['suite_images'] / 1e6:.1f} M training images) on {suite['device']}")
    print(
        " precision | step     | K |   img/s | training | beside (share) | compiling | total (min)"
    )
    for r in rows:
        cells = [
            f"{r['precision']:<9}",
            f"{r['step']:<8}",
            f"{r['folds_at_once']}",
            f"{r['img_per_s']:>7,.0f}",
            f"{r['training_min']:>8.1f}",
            f"{r['beside_training_min']:>6.1f} ({r['beside_training_share']:>4.0%})",
            f"{r['compiling_min']:>9.1f}",
            f"{r['total_min']:>6.1f}",
        ]
        print(" " + " | ".join(cells))
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
