"""Does the paper preset train at the paper's size? Fold 0, its validation curve, and controls.

    python benchmarks/convergence.py --metadata ../shared/adience/metadata      # synthetic, 256 px
    python benchmarks/convergence.py --data-root /data/adience                   # a real download
    python benchmarks/convergence.py ... --iterations 10000 --compare std --determinism 200
    python benchmarks/convergence.py --cache runs/cache                          # one already built
    python benchmarks/convergence.py ... --precision bf16 --step compiled        # on a GPU

Trains fold 0 (subject-disjoint split) with the `paper` preset (227 px crops of 256 px images,
LRN, Caffe init, SGD with the released solver's settings, the training images' mean image
subtracted from 0-255 pixels, no std) for `--iterations` steps of the paper's schedule (lr 1e-3,
x0.1 every 10k), validating after every epoch, and prints the curve. Without `--data-root` the
data are synthetic: `--metadata DIR` copies the real Adience users, folds and labels row for row
(`agegender synth --like-metadata`), else `--per-fold N` draws a small random layout.

`--compare std` trains the same budget with per-channel mean/std standardisation (inputs ~60x
smaller than what the Caffe init expects), `--compare shuffled` on permuted labels (chance).
`--determinism N` trains N iterations twice with `train.deterministic=true` and says whether the
two runs are identical. `--precision` and `--step` set `train.precision` and `train.step`. Each
run's time is split into training (the epochs' own images/s) and the rest (validation after every
epoch, testing with 10 crops, set-up and compiling): `benchmarks/projection.py` adds that share to
the suite's projected time. `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from agegender.cache import build_cache, open_cache
from agegender.config import CacheConfig, load_config
from agegender.splits import distribution_line, make_split
from agegender.synth.adience import write_synthetic
from agegender.train import train_fold

VARIANTS = {
    "paper": [],
    "std": ["data.normalize=channel_mean_std"],
    "shuffled": ["data.shuffle_labels=true"],
}


def _data(a: argparse.Namespace, root: Path) -> Path:
    if a.data_root is not None:
        source = Path(a.data_root)
    else:
        source = root / "adience"
        start = time.perf_counter()
        res = write_synthetic(
            source,
            size=a.image_size,
            per_fold=a.per_fold,
            like_metadata=a.metadata,
            seed=0,
        )
        print(
            f"synthetic Adience: {res.images:,} images drawn in {time.perf_counter() - start:.0f} s"
        )
    start = time.perf_counter()
    built = build_cache(source, root / "cache", config=CacheConfig(image_size=a.image_size))
    print(
        f"cache: {built.images:,} images at {a.image_size} px in "
        f"{time.perf_counter() - start:.0f} s (synthetic: {open_cache(root / 'cache').synthetic})"
    )
    opened = open_cache(root / "cache")
    split = make_split(opened.table, 0, load_config().data.split)
    for part in ("train", "val", "test"):
        print("fold 0 " + distribution_line(split, opened.table, part))
    return root / "cache"


def train(
    a: argparse.Namespace, cache: Path, out: Path, extra: list[str], label: str
) -> dict[str, Any]:
    config = load_config(
        None,
        [
            f"data.crop={a.crop}",
            f"train.iterations={a.iterations}",
            f"train.device={a.device}",
            f"train.precision={a.precision}",
            f"train.step={a.step}",
            f"optim.step_size={a.decay_every}",
            *extra,
        ],
        preset="paper",
    )
    curve: list[dict[str, Any]] = []

    def log(r: dict[str, Any]) -> None:
        curve.append({k: v for k, v in r.items() if isinstance(v, int | float)})
        val = {k: r.get(f"val_{k}", float("nan")) for k in ("age_acc", "age_1off", "gender_acc")}
        print(
            f"  {label:9} epoch {r['epoch']:3d} it {r['iteration']:6,d} lr {r['lr']:.0e} "
            f"train loss {r['train_loss']:.3f} | val loss {r['val_loss']:.3f} age "
            f"{val['age_acc']:.3f} 1-off {val['age_1off']:.3f} gender {val['gender_acc']:.3f} "
            f"| {r['images_per_s']:,.0f} img/s",
            flush=True,
        )

    start = time.perf_counter()
    s = train_fold(cache, 0, config, out, log=log).summary
    seconds = time.perf_counter() - start
    test = {k: v for k, v in s["test"].items() if isinstance(v, float)}
    train_s, done = 0.0, 0
    for r in curve:  # an epoch's images: the part, or what was left of the budget
        images = min(s["sizes"]["train"], (r["iteration"] - done) * config.data.batch_size)
        train_s, done = train_s + images / r["images_per_s"], r["iteration"]
    print(
        f"{label}: test after {s['iterations']:,} iterations ({seconds:.0f} s, of which "
        f"training {train_s:.0f} s; {s['step']}, {s['precision']}): "
        + ", ".join(f"{k} {v:.3f}" for k, v in test.items())
    )
    return {
        "label": label,
        "overrides": extra,
        "seconds": seconds,
        "train_seconds": train_s,
        "train_images": s["iterations"] * config.data.batch_size,
        "step": s["step"],
        "precision": s["precision"],
        "test": test,
        "curve": curve,
        "sizes": s["sizes"],
        "device": s["device"],
    }


def determinism(a: argparse.Namespace, cache: Path, root: Path) -> dict[str, Any]:
    short = argparse.Namespace(**{**vars(a), "iterations": a.determinism})
    extra = ["train.deterministic=true", "train.tencrop=false"]
    if a.step == "compiled":  # which cannot promise it: auto takes the graph step
        extra.append("train.step=auto")
    same = [train(short, cache, root / f"det{i}", extra, f"det{i}") for i in range(2)]

    def curve(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "images_per_s"} for e in r["curve"]]

    identical = same[0]["test"] == same[1]["test"] and curve(same[0]) == curve(same[1])
    print(f"determinism: two runs of {a.determinism} iterations identical: {identical}")
    return {"iterations": a.determinism, "identical": identical, "seconds": same[0]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=None, help="a real (or synthetic) download")
    ap.add_argument("--cache", type=Path, default=None, help="an image cache already built")
    ap.add_argument("--metadata", type=Path, default=None, help="synthetic copy of these folds")
    ap.add_argument(
        "--per-fold", type=int, default=200, help="synthetic rows a fold (no --metadata)"
    )
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--iterations", type=int, default=10_000)
    ap.add_argument("--decay-every", type=int, default=10_000, help="iterations per lr step")
    ap.add_argument("--compare", nargs="*", default=[], choices=["std", "shuffled"])
    ap.add_argument("--determinism", type=int, default=0, metavar="N")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--step", default="auto", choices=["auto", "eager", "graph", "compiled"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {name}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = a.cache if a.cache is not None else _data(a, root)
        runs = [train(a, cache, root / v, VARIANTS[v], v) for v in ["paper", *a.compare]]
        results["runs"] = runs
        if a.determinism:
            try:
                results["determinism"] = determinism(a, cache, root)
            except Exception as exc:  # report it: the curves above are what this run is for
                print(f"determinism: failed: {type(exc).__name__}: {exc}")
                results["determinism"] = {"error": f"{type(exc).__name__}: {exc}"}
    print("\nsummary (fold 0, test part, centre crop / 10-crop):")
    for r in runs:
        t = r["test"]
        cells = [
            f"{k} {t[k]:.3f}/{t.get(k + '_10crop', float('nan')):.3f}"
            for k in ("age_acc", "age_1off", "gender_acc")
            if k in t
        ]
        print(f"  {r['label']:9} {', '.join(cells)}  ({r['seconds']:.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
