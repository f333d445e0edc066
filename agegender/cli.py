"""The `agegender` command line. Thin: parse, call the library, print (JSON with --json).

Each layer adds its sub-commands with `add_commands(sub)`: this module the library's (synth,
prepare, data, train-fold, predict on files), `flows.cli` the orchestrated ones; `flows.cli`
builds the one `agegender` parser from them. `main` here is the library's commands alone.

Settings follow one precedence rule, in every command (`PRECEDENCE`, shown by `--help`):
preset < `--config` file < `key=value` overrides < the command's own flags. A flag is the most
specific thing typed, so it wins (`flag_overrides` applies flags as the last overrides).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table as RichTable
from rich.text import Text

from agegender import adience, cache, splits, train
from agegender.adience import MetadataError
from agegender.config import (
    CacheConfig,
    Config,
    Protocol,
    SplitConfig,
    Task,
    deviations,
    load_config,
)
from agegender.labels import AgePolicy
from agegender.synth.adience import write_synthetic
from agegender.synth.photos import write_photos
from agegender.synth.sources import write_synthetic_source

DESCRIPTION = "Age group and gender from face photos: data, training, prediction."
PRECEDENCE = (
    "Settings, each later one winning: the preset (--preset, else the --config file's `preset:`, "
    "else paper), the --config file, key=value overrides, then the command's own flags "
    "(train-fold --task, pretrain --source and --data-root): a flag beats an override of the "
    "same setting."
)

# soft_wrap: paths and messages stay on one line whatever the terminal (or pipe) width, so
# they can be grepped.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich bar on stderr and a throughput line, fed by the library's (done, total) callback.

    Started on the first item, so work that turns out to be cached prints nothing.
    """
    start = time.perf_counter()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
    )
    task: TaskID | None = None
    done = 0

    def update(n: int, total: int) -> None:
        nonlocal task, done
        if total == 0:
            return
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total, rate="")
        done = n
        rate = n / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=n, total=total, rate=f"{rate:,.0f} img/s")

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()
    if done:
        secs = time.perf_counter() - start
        err.print(f"{label}: {done:,} images in {secs:.1f} s ({done / secs:,.0f} img/s)")


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default=None,
        metavar="paper|modern|FILE",
        help="settings to start from (default: a --config file's `preset:`, else paper); "
        "--config and key=value overrides go on top",
    )


def _emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        human(data)


# each layout's real image side (photos: the width of users' 4:3 photos with 0-3 faces)
SYNTH_SIZES = {"adience": 816, "celeba": 178, "utkface": 200, "photos": 1024}


def cmd_synth(a: argparse.Namespace) -> None:
    size = a.size or SYNTH_SIZES[a.format]
    if a.format == "photos":
        written = write_photos(a.out, a.count, size, a.seed)
        info = {"out": str(a.out), "format": a.format, "images": len(written)}
        _emit(info, a.json, lambda d: out.print(f"wrote {d['images']:,} photos to {d['out']}"))
        return
    if a.format != "adience":
        with progress_bar("drawing faces") as bar:
            src = write_synthetic_source(
                a.format, a.out, n=a.count, size=size, seed=a.seed, workers=a.workers, progress=bar
            )
        info = {
            "out": str(a.out),
            "format": a.format,
            "images": len(src),
            "problems": len(src.problems),
        }
        _emit(
            info,
            a.json,
            lambda d: out.print(f"wrote {d['images']:,} {d['format']} images to {d['out']}"),
        )
        return
    with progress_bar("drawing faces") as bar:
        res = write_synthetic(
            a.out,
            size=size,
            per_fold=a.per_fold,
            seed=a.seed,
            like_metadata=a.like_metadata,
            workers=a.workers,
            progress=bar,
        )
    data = {"out": str(res.out), "rows": res.rows, "images": res.images, "written": res.rewritten}
    _emit(
        data,
        a.json,
        lambda d: out.print(
            f"wrote {d['written']:,} of {d['images']:,} images and {d['rows']:,} metadata rows to "
            f"{d['out']}"
        ),
    )


def cmd_prepare(a: argparse.Namespace) -> None:
    config = CacheConfig(
        image_size=a.image_size, draft=not a.no_draft, resize=a.resize, workers=a.workers
    )
    with progress_bar("decoding images") as bar:
        if a.format == "adience":
            res = cache.build_cache(a.data_root, a.cache, a.metadata, config, progress=bar)
        elif a.metadata is not None:
            raise ValueError(f"--metadata is for Adience; {a.format} has its lists in --data-root")
        else:
            res = cache.build_source_cache(a.format, a.data_root, a.cache, config, progress=bar)

    def human(d: dict[str, Any]) -> None:
        verb = "built" if res.rebuilt else "unchanged"
        out.print(
            f"cache {verb}: {d['cache']}  ({d['images']:,} images, decoded {d['decoded']:,}, "
            f"reused {d['reused']:,}, skipped {d['skipped']:,})"
        )
        out.print(f"fingerprint {d['fingerprint'][:16]}")
        if res.problems:
            out.print(f"[yellow]{d['skipped']} problem(s) listed in {d['report']}:[/]")
            for p in res.problems[:10]:
                out.print(f"  {p.source}  " + (f"{p.path}: " if p.path else "") + p.problem)
            if len(res.problems) > 10:
                out.print(f"  ... and {len(res.problems) - 10} more")

    _emit(res.as_dict(), a.json, human)


def cmd_stats(a: argparse.Namespace) -> None:
    if a.cache:
        table = cache.open_cache(a.cache).table
    elif a.metadata:
        table = adience.read_metadata(a.metadata)
    else:
        raise ValueError("give --metadata DIR (fold_K_data.txt files) or --cache DIR")
    data = adience.stats(table, a.age_policy)

    def human(d: dict[str, Any]) -> None:
        parts = {**{f"fold {k}": v for k, v in d["folds"].items()}, "total": d["total"]}
        t = RichTable(title=f"Adience metadata (age policy: {d['age_policy']})")
        t.add_column("")
        for name in parts:
            t.add_column(name, justify="right")
        counts = ["rows", "duplicates", "users", "age_labelled", "gender_labelled", "both_labelled"]
        for c in counts:
            t.add_row(c, *(f"{p[c]:,}" for p in parts.values()))
        for key, prefix in (("age_groups", "age "), ("genders", "gender ")):
            for name in d["total"][key]:
                t.add_row(prefix + name, *(f"{p[key][name]:,}" for p in parts.values()))
        out.print(t)

    _emit(data, a.json, human)


def cmd_split(a: argparse.Namespace) -> None:
    config = SplitConfig(
        protocol=a.protocol,
        age_policy=a.age_policy,
        val_fraction=a.val_fraction,
        seed=a.seed,
        lists=a.lists,
    )
    table = cache.open_cache(a.cache).table if a.cache else adience.read_metadata(a.metadata)
    split = splits.make_split(table, a.fold, config)
    data = split.summary(table)
    for note in split.notes:
        err.print(Text.assemble(("note: ", "yellow"), note), highlight=False, soft_wrap=True)

    def human(d: dict[str, Any]) -> None:
        t = RichTable(title=f"fold {d['fold']} ({d['protocol']}, age policy {d['age_policy']})")
        for c in ["part", "rows", "age", "gender", "users"]:
            t.add_column(c, justify="right")
        for p in splits.PARTS:
            t.add_row(p, *(f"{d[p][c]:,}" for c in ["rows", "age", "gender", "users"]))
        out.print(t)
        if d.get("stratified") is not None:
            how = "stratified by label" if d["stratified"] else "random"
            out.print(f"validation users: {how} (seed {d['seed']})", highlight=False)
        for p in splits.PARTS:
            out.print(splits.distribution_line(split, table, p), highlight=False, soft_wrap=True)
        out.print("shared users: " + ", ".join(f"{k} {v}" for k, v in d["shared_users"].items()))

    _emit(data, a.json, human)


def cmd_train_fold(a: argparse.Namespace) -> None:
    config = train_fold_config(a)
    out_dir = a.out or Path("runs/train") / f"{config.train.task}-fold{a.fold}-{config.hash()}"
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("epoch 1", total=None)
    epoch = [1]

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, description=f"epoch {epoch[0]}")

    def log(record: dict[str, Any]) -> None:
        bar.console.print(train.epoch_line(record), highlight=False, soft_wrap=True)
        epoch[0] = record["epoch"] + 1
        bar.reset(task)

    ts = train.adience_fold(cache.open_cache(a.cache), a.fold, config)
    for line in ts.about:
        err.print(line, highlight=False)
    changed = deviations(config)
    err.print(
        f"training {config.train.task} on fold {a.fold} -> {out_dir} (config {config.hash()}, "
        f"preset {config.preset}" + (f" with {', '.join(changed)})" if changed else ")"),
        highlight=False,
    )
    with bar:
        res = train.train(ts, config, out_dir, resume=a.resume, log=log, progress=progress)
    for note in res.summary["notes"]:
        err.print(Text.assemble(("note: ", "yellow"), note), highlight=False, soft_wrap=True)

    def human(d: dict[str, Any]) -> None:
        test = d["test"]
        t = RichTable(
            title=f"fold {d['fold']} {d['task']}: test at epoch {d['tested_epoch']}, "
            f"{d['selected_by']}, preset {d['preset']}"
            + (" — SYNTHETIC data" if d.get("synthetic") else "")
        )
        t.add_column("metric")
        t.add_column("centre crop", justify="right")
        t.add_column("10-crop", justify="right")
        for key in ("age_acc", "age_1off", "gender_acc"):
            if key in test:
                ten = test.get(f"{key}_10crop")
                t.add_row(key, f"{test[key]:.4f}", "-" if ten is None else f"{ten:.4f}")
        out.print(t)
        out.print(f"results in {res.out_dir}")

    _emit(res.summary, a.json, human)


def _csv_row(row: dict[str, Any], heads: dict[str, list[str]]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if not k.endswith("_probs")}
    flat["box"] = " ".join(map(str, row["box"])) if row.get("box") else ""
    for head, names in heads.items():
        probs = row.get(f"{head}_probs") or {}
        flat |= {f"{head}_prob_{n}": probs.get(n, "") for n in names}
    return flat


def cmd_predict(a: argparse.Namespace) -> None:
    from agegender.detect import FaceDetector
    from agegender.predict import Predictor, collect_paths, predict_paths

    predictor = Predictor.load(predict_model(a.model), a.device)
    detector = None if a.no_detect else FaceDetector()
    paths = collect_paths(a.paths)
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, a.paths))}")
    sink = a.out.open("w", newline="") if a.out else sys.stdout
    heads = predictor.labels
    fields = ["path", "face", "box", "status", "error"]
    fields += [c for h in heads for c in (h, f"{h}_prob", *(f"{h}_prob_{n}" for n in heads[h]))]
    writer = csv.DictWriter(sink, fieldnames=fields) if a.format == "csv" else None
    if writer:
        writer.writeheader()
    status: Counter[str] = Counter()
    photos: set[str] = set()
    try:
        with progress_bar("photos") as bar:
            rows = predict_paths(
                predictor, paths, a.oversample, a.batch_size, progress=bar, detector=detector
            )
            for row in rows:
                status[row["status"]] += 1
                photos.add(row["path"])
                if writer:
                    writer.writerow(_csv_row(row, heads))
                else:
                    sink.write(json.dumps(row) + "\n")
    finally:
        if a.out:
            sink.close()
    faces = status["face"] + status["whole image"]
    err.print(
        f"{len(paths)} photo(s): {faces} face(s) predicted"
        + (f", {status['no face']} photo(s) without a face" if detector else " (whole images)")
        + f", {status['error']} could not be used"
    )


def predict_model(model: str) -> Path:
    """A best.pt, its run folder, or a downloaded MLflow model folder (artifacts/best.pt)."""
    path = Path(model)
    for candidate in (path, path / "best.pt", path / "artifacts" / "best.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"--model {model}: no such checkpoint (a best.pt, its folder, or a models:/ URI)"
    )


class Commands(typing.Protocol):
    """Where a layer adds its sub-commands: what `ArgumentParser.add_subparsers()` returns."""

    def add_parser(
        self, name: str, *, help: str | None = ..., epilog: str | None = ...
    ) -> argparse.ArgumentParser: ...


def new_parser(description: str) -> tuple[argparse.ArgumentParser, Commands]:
    """The `agegender` parser, `--debug` and the precedence rule in its help, with no commands
    yet: each layer's `add_commands` adds its own (`flows.cli.build_parser` assembles them)."""
    p = argparse.ArgumentParser(prog="agegender", description=description, epilog=PRECEDENCE)
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, the full traceback (and Prefect's logged ones), not one error line",
    )
    return p, p.add_subparsers(dest="command", required=True)


def add_commands(sub: Commands, predict: bool = True) -> None:
    """The library's commands; `predict=False` where the caller adds a `predict` of its own
    (the orchestration's, which also takes model URIs) with `add_predict`."""
    s = sub.add_parser("synth", help="write a synthetic dataset in a real dataset's layout")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--format", choices=sorted(SYNTH_SIZES), default="adience")
    s.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels (default: the real one, e.g. Adience 816)",
    )
    s.add_argument("--count", type=int, default=200, help="images (celeba, utkface, photos)")
    s.add_argument("--per-fold", type=int, default=100, help="rows per fold (random structure)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--like-metadata",
        type=Path,
        default=None,
        help="copy the users, folds and labels of these fold_K_data.txt files",
    )
    s.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="decode every image once into the memory-mapped cache")
    s.add_argument(
        "--data-root", type=Path, required=True, help="the download (Adience: has aligned/)"
    )
    s.add_argument("--format", choices=sorted(SYNTH_SIZES), default="adience")
    s.add_argument("--cache", type=Path, required=True, help="cache directory to create/update")
    s.add_argument(
        "--metadata",
        type=Path,
        default=None,
        help="folder of fold_K_data.txt (default: the data root)",
    )
    s.add_argument("--image-size", type=int, default=256)
    s.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full scale")
    s.add_argument(
        "--resize",
        choices=("antialias", "caffe"),
        default="antialias",
        help="antialias: ours (JPEG draft, antialiased bilinear); caffe: as convert_imageset "
        "(full decode, cv::resize bilinear without antialiasing)",
    )
    s.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_prepare)

    data = sub.add_parser("data", help="inspect metadata and splits").add_subparsers(
        dest="data_command", required=True
    )
    for name, func, doc in [
        ("stats", cmd_stats, "label and user counts per fold"),
        ("split", cmd_split, "train/val/test of one fold"),
    ]:
        s = data.add_parser(name, help=doc)
        src = s.add_mutually_exclusive_group(required=True)
        src.add_argument("--metadata", type=Path, help="folder of fold_K_data.txt")
        src.add_argument("--cache", type=Path, help="a prepared cache (rows that have images)")
        s.add_argument("--age-policy", choices=get_args(AgePolicy), default="strict")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)
        if name == "split":
            s.add_argument("--fold", type=int, required=True, choices=range(adience.N_FOLDS))
            s.add_argument("--protocol", choices=get_args(Protocol), default="subject_disjoint")
            s.add_argument(
                "--lists",
                type=Path,
                default=None,
                help="Levi-Hassner list folder (test_fold_is_K/...)",
            )
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--val-fraction", type=float, default=0.1)
    s = sub.add_parser(
        "train-fold", help="train and evaluate one cross-validation fold", epilog=PRECEDENCE
    )
    s.add_argument("--cache", type=Path, required=True, help="a prepared cache")
    s.add_argument("--fold", type=int, required=True, choices=range(adience.N_FOLDS))
    s.add_argument("--task", choices=get_args(Task), default=None, help="= train.task")
    add_preset_argument(s)
    s.add_argument("--config", type=Path, default=None, help="YAML or JSON config file")
    s.add_argument("--out", type=Path, default=None, help="run directory (default under runs/)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument("--json", action="store_true", help="print result.json to stdout")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=20")
    s.set_defaults(func=cmd_train_fold)

    if predict:
        add_predict(sub, cmd_predict, "a best.pt or its run folder")


def add_predict(
    sub: Commands, func: Callable[[argparse.Namespace], None], model_help: str
) -> argparse.ArgumentParser:
    """`predict`'s arguments, for `func`: `cmd_predict` (files), or a caller's that takes more
    kinds of `--model` and hands files to `cmd_predict`."""
    s = sub.add_parser("predict", help="age group and gender of the faces in new photos")
    s.add_argument("paths", nargs="+", type=Path, help="images, folders or .txt lists of paths")
    s.add_argument("--model", required=True, help=model_help)
    s.add_argument(
        "--no-detect",
        action="store_true",
        help="no face detection: each photo is one aligned face (as Adience's aligned images)",
    )
    s.add_argument("--oversample", action="store_true", help="10-crop over-sampling")
    s.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    s.add_argument("--out", type=Path, default=None, help="file (default: stdout)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]")
    s.set_defaults(func=func)
    return s


def flag_overrides(args: argparse.Namespace, keys: Mapping[str, str]) -> list[str]:
    """The user's `key=value` overrides, then each flag given (`dest` -> config key) as one more:
    the last wins, so the flag does (`PRECEDENCE`). Values go as JSON, which the overrides' YAML
    reads back unchanged (a path named `2024` or `on` stays a string)."""
    flags = []
    for dest, key in keys.items():
        value = getattr(args, dest)
        if value is not None:
            flags.append(f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}")
    return [*args.overrides, *flags]


def train_fold_config(a: argparse.Namespace) -> Config:
    return load_config(a.config, flag_overrides(a, {"task": "train.task"}), a.preset)


def _error(message: str) -> None:
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)


# Failures that bad input or settings cause: one `error:` line each, no traceback (`--debug`
# shows it). pydantic's ValidationError is a ValueError.
EXPECTED: tuple[type[Exception], ...] = (
    MetadataError,
    cache.CacheError,
    train.RunError,
    FileNotFoundError,
    ValueError,
)


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    extra_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse and dispatch; expected failures print one clear line and exit 2, no traceback
    (with `--debug`, everything propagates with its traceback)."""
    args = parse(parser, argv)
    if getattr(args, "debug", False):
        args.func(args)
        return 0
    expected = (*EXPECTED, *extra_errors)
    try:
        args.func(args)
    except ValidationError as exc:
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "config"
            _error(f"{loc}: {e['msg']}")
        return 2
    except expected as exc:
        _error(str(exc))
        return 2
    return 0


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """As argparse, but `key=value` overrides may also follow options (`--preset modern
    data.crop=64`), which argparse alone refuses once a positional list has ended."""
    args, rest = parser.parse_known_args(argv)
    late = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(late) < len(rest) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The library's commands alone (the `agegender` command is `flows.cli.main`)."""
    parser, sub = new_parser(DESCRIPTION)
    add_commands(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
