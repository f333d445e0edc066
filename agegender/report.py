"""The suite's summary: like-for-like tables against Levi & Hassner, and our variants compared.

Every table states its protocol, and every difference from the published one, in the table
itself: a number is only comparable to theirs under the same split, validation, selection,
normalisation, initialisation, resize and crop mode, and what differs is printed next to it.
Ours are set against theirs like for like: 10-crop against their over-sampled results, centre
crop against their single-crop results (Levi & Hassner 2015, Tables 3 and 4), and the
single-task `age` and `gender` variants against their single-task nets, with the multi-task
models as rows of their own. Results on synthetic images are never set against the published
real-data numbers: the summary says so in its title and makes no such test.

Statistics (see `agegender.stats`): Welch's t-test from summary statistics against published
numbers, the corrected resampled t-test between our variants, Holm's correction over every
p-value printed in one summary, and a 95 % CI for every difference.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from agegender.config import Config
from agegender.metrics import sample_std
from agegender.stats import CORRECTED, WELCH, Difference, corrected_paired, holm, welch

METRICS = ("age_acc", "age_1off", "gender_acc")
NAMES = {"age_acc": "age exact", "age_1off": "age 1-off", "gender_acc": "gender"}
CROPS = {"": "centre crop", "_10crop": "10-crop"}


@dataclass(frozen=True)
class Published:
    name: str
    crop: str  # "" (single centre crop) or "_10crop" (over-sampling)
    values: dict[str, tuple[float, float]]  # metric -> (mean, std) over their 5 folds
    source: str
    n: int = 5


# Levi & Hassner, "Age and Gender Classification using Convolutional Neural Networks", CVPR
# workshops 2015: Table 3 (gender) and Table 4 (age: exact and 1-off), 5-fold mean ± std.
LEVI_HASSNER = (
    Published(
        "Levi & Hassner 2015, over-sample",
        "_10crop",
        {"age_acc": (0.507, 0.051), "age_1off": (0.847, 0.022), "gender_acc": (0.868, 0.014)},
        "Tables 3-4, 'Proposed using over-sample'",
    ),
    Published(
        "Levi & Hassner 2015, single crop",
        "",
        {"age_acc": (0.495, 0.044), "age_1off": (0.846, 0.017), "gender_acc": (0.859, 0.014)},
        "Tables 3-4, 'Proposed using single crop'",
    ),
)
# As cited in the same tables ("Best from [10]"): not a CNN, not like for like; shown only.
EIDINGER = Published(
    "Eidinger et al. 2014, dropout-SVM",
    "",
    {"age_acc": (0.451, 0.026), "age_1off": (0.795, 0.014), "gender_acc": (0.778, 0.013)},
    "as cited in Levi & Hassner Tables 3-4",
)
THEIR_PROTOCOL = {
    "data": "Adience (real photos)",
    "split": "their published lists (test = metadata fold k)",
    "validation": "random 10 % of training rows (shares users with training)",
    "tested checkpoint": "not stated (the released solver runs to 50k iterations)",
    "normalisation": "per-pixel mean image, 0-255, no std",
    "initialisation": "Gaussian N(0, 0.01) (Caffe fillers)",
    "training": "SGD, batch 50, lr 1e-3, 1e-4 after 10k, 50k iterations",
    "resize": "256 px images, 227 px crops",
    "repeats": "1 run per fold",
    "model": "one net per task",
}
CROP_THEIRS = {"": "single centre crop", "_10crop": "over-sample (4 corners + centre, mirrored)"}


Row = tuple[str, str, str, str]  # setting, ours, theirs, same | differs | unknown


def protocol(config: Config, image_size: int, synthetic: bool, seeds: int) -> list[Row]:
    """The protocol rows: ours (from the config that trained the folds) next to theirs."""
    s, o, t = config.data.split, config.optim, config.train
    lists = s.protocol == "levi_hassner"
    if lists:
        split, val = "the published Levi-Hassner lists", THEIR_PROTOCOL["validation"]
    else:
        split = "subject-disjoint (test = metadata fold k)"
        val = f"{s.val_fraction:.0%} of training users, user-disjoint" + (
            ", stratified by label" if s.stratify else ", random"
        )
    norm = {
        "mean_image": "per-pixel mean image, 0-255, no std",
        "channel_mean": "per-channel mean, 0-255, no std",
        "channel_mean_std": "per-channel mean and std",
    }[config.data.normalize]
    if o.schedule == "step":
        drops = "every" if o.step_repeat else "once after"
        every = (
            f"{o.step_size:,} iterations"
            if o.decay_every is None
            else f"{o.decay_every:.0%} of training"
        )
        sched = f"x{o.gamma:g} {drops} {every}"
    else:
        sched = o.schedule
    length = f"{t.epochs:g} epochs" if t.epochs is not None else f"{t.iterations:,} iterations"
    paper_solver = (
        o.name == "sgd"
        and o.lr == 1e-3
        and o.schedule == "step"
        and o.gamma == 0.1
        and t.epochs is None
        and t.iterations == 50_000
        and o.step_every(t.iterations) == 10_000
        and config.data.batch_size == 50
    )
    init = {"caffe": "Gaussian (Caffe fillers)", "pytorch": "PyTorch default"}[config.model.init]
    if config.model.norm != "lrn":
        init += ", batch norm instead of LRN"
    rows = [
        (
            "data",
            "SYNTHETIC images (agegender synth)" if synthetic else "Adience (real photos)",
            not synthetic,
        ),
        ("split", split, lists),
        ("validation", val, lists),
        (
            "tested checkpoint",
            "final iteration" if t.test_at == "final" else f"best validation {t.select_metric}",
            None,
        ),
        ("normalisation", norm, config.data.normalize == "mean_image"),
        ("initialisation", init, config.model.init == "caffe" and config.model.norm == "lrn"),
        (
            "training",
            f"{o.name.upper()}, batch {config.data.batch_size}, lr {o.lr:g} {sched}, {length}",
            paper_solver,
        ),
        (
            "resize",
            f"{image_size} px images, {config.data.crop} px crops",
            image_size == 256 and config.data.crop == 227,
        ),
        (
            "repeats",
            "1 run per fold" if seeds == 1 else f"{seeds} runs per fold, averaged per fold",
            seeds == 1,
        ),
        ("model", "see each row", None),
    ]
    verdict = {True: "same", False: "differs", None: "not comparable"}
    return [(key, mine, THEIR_PROTOCOL[key], verdict[same]) for key, mine, same in rows]


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if np.isfinite(std) else f"{100 * mean:.1f}"


def _ci(d: Difference) -> str:
    if not np.isfinite(d.low):
        return f"{100 * d.diff:+.1f} (CI undefined)"
    return f"{100 * d.diff:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def variant_description(variant: str) -> str:
    """What a variant is, in the tables' words (and in MLflow's descriptions)."""
    return {
        "age": "single-task (age), like theirs",
        "gender": "single-task (gender), like theirs",
        "multitask": "multi-task from scratch (one net, both heads)",
        "multitask_pretrained": "multi-task, backbone pretrained on a larger face set",
    }.get(variant, variant)


def _heads(variant: str) -> tuple[str, ...]:
    return {"age": ("age_acc", "age_1off"), "gender": ("gender_acc",)}.get(variant, METRICS)


def summarize(
    aggregates: dict[str, dict[str, Any]],
    configs: dict[str, Config],
    image_size: int,
    synthetic: bool,
    title: str = "agegender",
) -> dict[str, Any]:
    """Markdown tables and the numbers behind them (every test, with its Holm-adjusted p)."""
    vals = {v: a["values"] for v, a in aggregates.items()}
    folds = {v: a["folds"] for v, a in aggregates.items()}
    order = _order(vals)
    base = configs.get("multitask") or next(iter(configs.values()))
    ours = protocol(base, image_size, synthetic, _seeds(aggregates))
    n_folds = max((len(f) for f in folds.values()), default=0)

    lines = _header(title, synthetic, n_folds)
    narrow = list(lines)
    tests: list[dict[str, Any]] = []
    suffixes = [s for s in ("_10crop", "") if any(m + s in vals[v] for v in order for m in METRICS)]
    for number, suffix in suffixes_numbered(suffixes):
        lines += _crop_table(number, suffix, vals, order, ours, synthetic)
        narrow += _crop_table(number, suffix, vals, order, ours, synthetic, narrow=True)
        if not synthetic:
            tests += _published_tests(number, suffix, vals, order)
    pairs = _pairs(vals)
    # 10-crop only where both sides of every pair have it (a variant may lack it)
    sides = [side for va, ma, vb, mb in pairs for side in ((va, ma), (vb, mb))]
    primary = "_10crop" if all(f"{m}_10crop" in vals[v] for v, m in sides) else ""
    tests += [_variant_test(aggregates, pair, primary) for pair in pairs]

    adjusted = holm([t["diff"].p for t in tests])
    for t, p in zip(tests, adjusted, strict=True):
        t["p_holm"] = p
    m_tests = sum(np.isfinite(t["diff"].p) for t in tests)
    tail = _published_section([t for t in tests if t["table"] != "variants"], n_folds, m_tests)
    tail += _variants_section([t for t in tests if t["table"] == "variants"], primary, m_tests)
    return {
        "markdown": "\n".join(lines + tail),
        "narrow_markdown": "\n".join(narrow + tail),
        "protocol_markdown": protocol_markdown(order, ours, suffixes),
        "tests": [{k: v for k, v in t.items() if k != "diff"} | t["diff"].as_dict() for t in tests],
        "synthetic": synthetic,
        "protocol": [list(r) for r in ours],
    }


def _order(variants: Collection[str]) -> list[str]:
    """Single-task rows first, as their tables read; unknown variants keep their own order."""
    order = [v for v in ("age", "gender", "multitask", "multitask_pretrained") if v in variants]
    return order + [v for v in variants if v not in order]


def _seeds(aggregates: dict[str, dict[str, Any]]) -> int:
    """The repeats row states the most any variant ran, 1 where seeds were not logged."""
    seeds = [s for a in aggregates.values() for s in a.get("sizes", {}).get("seeds", [])]
    return int(max(seeds, default=1))


def _header(title: str, synthetic: bool, n_folds: int) -> list[str]:
    """The title says SYNTHETIC so that no one reads these numbers as real-data results."""
    head = f"# {title}: summary" + (
        " — SYNTHETIC DATA (generated images, not Adience)" if synthetic else ""
    )
    lines = [head, ""]
    if synthetic:
        lines += [
            "These numbers come from synthetic images. Published real-data results are not "
            "shown next to them and nothing is tested against them.",
            "",
        ]
    return [*lines, f"Accuracies in %, mean ± sample std (ddof=1) over {n_folds} folds.", ""]


def _theirs(suffix: str) -> Published:
    """Their result under our crop mode: only that one is like for like."""
    return next(p for p in LEVI_HASSNER if p.crop == suffix)


def _crop_table(
    number: int,
    suffix: str,
    vals: dict[str, dict[str, list[float]]],
    order: list[str],
    ours: list[Row],
    synthetic: bool,
    narrow: bool = False,
) -> list[str]:
    """One table per crop mode, protocol included, since ours compare to theirs only within one.
    `narrow`: without the protocol and the variants' descriptions (`protocol_markdown` holds
    them), for a page that cuts wide tables off."""
    theirs = _theirs(suffix)
    lines = [
        f"## Table {number}. Ours, {CROPS[suffix]}"
        + ("" if synthetic else f", vs {theirs.name} ({theirs.source})"),
        "",
        "| model | age exact | age 1-off | gender |" if narrow else MODEL_HEAD,
        "|---|---|---|---|" if narrow else "|---|---|---|---|---|",
    ]
    for v in order:
        described = "" if narrow else f" {variant_description(v)} |"
        lines.append(f"| ours: {v} |{described} " + " | ".join(_cells(vals[v], v, suffix)) + " |")
    if not synthetic:
        published = _published_rows(theirs)
        lines += (
            ["|".join(r.split("|")[:2] + r.split("|")[3:]) for r in published]
            if narrow
            else published
        )
    if narrow:
        return [*lines, ""]
    lines += ["", "| protocol | ours | Levi & Hassner | |", "|---|---|---|---|"]
    for key, mine, their, same in [
        *ours,
        ("crop mode", CROPS[suffix], CROP_THEIRS[suffix], "same"),
    ]:
        lines.append(f"| {key} | {mine} | {their} | {same} |")
    return [*lines, ""]


MODEL_HEAD = "| model | trained as | age exact | age 1-off | gender |"


def protocol_markdown(order: list[str], ours: list[Row], suffixes: list[str]) -> str:
    """The variants and the protocol, ours next to theirs, once for all tables: the part of the
    summary that `narrow` tables leave out."""
    lines = ["## Variants", "", *(f"- **{v}**: {variant_description(v)}" for v in order), ""]
    lines += ["## Protocol", "", "| setting | ours | Levi & Hassner | |", "|---|---|---|---|"]
    crops = [
        ("crop mode", CROPS[s], CROP_THEIRS[s], f"Table {n}")
        for n, s in suffixes_numbered(suffixes)
    ]
    lines += [
        f"| {key} | {mine} | {their} | {same} |" for key, mine, their, same in [*ours, *crops]
    ]
    return "\n".join(lines)


def suffixes_numbered(suffixes: list[str]) -> list[tuple[int, str]]:
    """(table number, crop suffix) as `summarize` numbers its tables."""
    return [(n, s) for n, s in enumerate(("_10crop", ""), start=1) if s in suffixes]


def _cells(values: dict[str, list[float]], variant: str, suffix: str) -> list[str]:
    """'-' where a single-task net has no head for the metric, or the crop was not tested."""
    return [
        _fmt(float(np.mean(values[m + suffix])), sample_std(values[m + suffix]))
        if m in _heads(variant) and m + suffix in values
        else "-"
        for m in METRICS
    ]


def _published_rows(theirs: Published) -> list[str]:
    """Theirs under the same crop; Eidinger's (centre crop only) for scale, not compared."""
    lines = [f"| {theirs.name} | one net per task | " + " | ".join(_published_cells(theirs)) + " |"]
    if theirs.crop == "":
        lines.append(
            f"| {EIDINGER.name} ({EIDINGER.source}; not a CNN, shown only) | - | "
            + " | ".join(_published_cells(EIDINGER))
            + " |"
        )
    return lines


def _published_cells(p: Published) -> list[str]:
    return [_fmt(*p.values[m]) for m in METRICS]


def _published_tests(
    number: int, suffix: str, vals: dict[str, dict[str, list[float]]], order: list[str]
) -> list[dict[str, Any]]:
    """Welch from summary statistics: their folds are not ours, so nothing can be paired."""
    theirs = _theirs(suffix)
    tests = []
    for v in order:
        for m in _heads(v):
            if m + suffix not in vals[v]:
                continue
            x = vals[v][m + suffix]
            mean, std = theirs.values[m]
            tests.append(
                {
                    "key": f"{v}_{m}{suffix}_vs_levi_hassner",
                    "table": number,
                    "what": f"ours {v} − {theirs.name}",
                    "metric": NAMES[m] + f" ({CROPS[suffix]})",
                    "diff": welch(float(np.mean(x)), sample_std(x), len(x), mean, std, 5),
                }
            )
    return tests


Pair = tuple[str, str, str, str]  # variant A, its metric, variant B, its metric


def _pairs(vals: dict[str, dict[str, list[float]]]) -> list[Pair]:
    """The questions the variants answer: does pretraining help, does multi-tasking cost."""
    pairs: list[Pair] = []
    if {"multitask", "multitask_pretrained"} <= vals.keys():
        pairs += [("multitask_pretrained", m, "multitask", m) for m in METRICS]
    for m, single in (("age_acc", "age"), ("age_1off", "age"), ("gender_acc", "gender")):
        if "multitask" in vals and single in vals:
            pairs.append(("multitask", m, single, m))
    return pairs


def _variant_test(
    aggregates: dict[str, dict[str, Any]], pair: Pair, primary: str
) -> dict[str, Any]:
    """Paired over the folds both ran, corrected because the folds' training sets overlap."""
    va, ma, vb, mb = pair
    fa, fb = aggregates[va]["folds"], aggregates[vb]["folds"]
    common = sorted(set(fa) & set(fb))
    a = [aggregates[va]["values"][ma + primary][fa.index(k)] for k in common]
    b = [aggregates[vb]["values"][mb + primary][fb.index(k)] for k in common]
    return {
        "key": f"{va}_vs_{vb}_{ma}{primary}",
        "table": "variants",
        "what": f"{va} − {vb}",
        "metric": NAMES[ma] + f" ({CROPS[primary]})",
        "diff": corrected_paired(a, b, _ratio(aggregates, (va, vb))),
        "folds": common,
    }


def _published_section(tests: list[dict[str, Any]], n_folds: int, m_tests: int) -> list[str]:
    """States that two reported results are compared, not paired folds."""
    return _tests_section(
        "## Differences from Levi & Hassner (ours − theirs, points)",
        f"{WELCH}: our n = {n_folds} folds and std against their n = 5 and std; their folds "
        "are not ours, so this compares two reported results. 95 % CI of the difference. "
        f"Holm-adjusted over the {m_tests} p-values of this summary.",
        "Welch",
        tests,
    )


def _variants_section(tests: list[dict[str, Any]], primary: str, m_tests: int) -> list[str]:
    """States the correction and the crop, without which the p-values cannot be read."""
    return _tests_section(
        "## Our variants compared (A − B, points, same folds)",
        f"{CORRECTED}: the fold differences' variance is scaled by (1/k + n_test/n_train) "
        f"because the folds' training sets overlap; df = k − 1. On {CROPS[primary]} results. "
        f"95 % CI of the difference. Holm-adjusted over the {m_tests} p-values of this summary "
        "('-': undefined, no variance).",
        "corrected t",
        tests,
    )


def _tests_section(heading: str, note: str, test: str, tests: list[dict[str, Any]]) -> list[str]:
    """One layout for both kinds of test, so their tables read alike; none if nothing tested."""
    if not tests:
        return []
    return [
        heading,
        "",
        note,
        "",
        f"| comparison | metric | difference [95 % CI] | p ({test}) | p (Holm) |",
        "|---|---|---|---|---|",
        *[_test_row(t) for t in tests],
        "",
    ]


def _test_row(t: dict[str, Any]) -> str:
    d: Difference = t["diff"]
    p = "-" if not np.isfinite(d.p) else f"{d.p:.3g}"
    ph = "-" if not np.isfinite(t["p_holm"]) else f"{t['p_holm']:.3g}"
    return f"| {t['what']} | {t['metric']} | {_ci(d)} | {p} | {ph} |"


def _ratio(aggregates: dict[str, dict[str, Any]], variants: tuple[str, ...]) -> float:
    """n_test / n_train per fold, averaged over the folds of the compared variants (k-fold:
    ~1 / (k - 1) when sizes were not logged)."""
    ratios = [
        te / tr
        for v in variants
        for te, tr in zip(
            aggregates[v].get("sizes", {}).get("n_test", []),
            aggregates[v].get("sizes", {}).get("n_train", []),
            strict=False,
        )
        if tr > 0
    ]
    if ratios:
        return float(np.mean(ratios))
    k = max(len(aggregates[v]["folds"]) for v in variants)
    return 1 / max(k - 1, 1)


def variant_table(values: dict[str, list[float]]) -> str:
    """One variant's test metrics per fold, with mean and sample std (its parent's results.md)."""
    lines = ["| metric | mean | std (ddof=1) | folds |", "|---|---|---|---|"]
    for k, v in values.items():
        lines.append(
            f"| test_{k} | {np.mean(v):.4f} | {sample_std(v):.4f} | "
            + ", ".join(f"{x:.3f}" for x in v)
            + " |"
        )
    return "\n".join(lines)
