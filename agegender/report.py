"""The suite's summary: like-for-like tables against Levi & Hassner, and our variants compared.

Every table states its protocol, and every difference from the published one, in the table
itself: a number is only comparable to theirs under the same split, validation, selection,
normalisation, initialisation, resize and crop mode, and what differs is printed next to it.
Ours are set against theirs like for like: 10-crop against their over-sampled results, centre
crop against their single-crop results (Levi & Hassner 2015, their gender and age tables), and
the single-task `age` and `gender` variants against their single-task nets, with the multi-task
models as rows of their own. Results on synthetic images are never set against the published
real-data numbers: the summary says so in its title and makes no such test.

Statistics (see `agegender.stats`): Welch's t-test from summary statistics against published
numbers, under both readings of their ± (a std over folds, or a standard error: SD = SE x sqrt(5);
`suite.published_spread` picks the headline), paired over folds instead where a paper gives
per-fold numbers; the corrected resampled t-test between our variants; Holm's correction over
every p-value printed in one summary (per reading); and for every difference a simultaneous
(Bonferroni) interval, which excludes 0 only where the Holm-adjusted p is below 0.05. Each
fold's test accuracy also gets a user-clustered bootstrap interval (its own section), since a
user's faces are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agegender.config import Config, Resize
from agegender.metrics import sample_std
from agegender.stats import (
    BOOTSTRAP_DRAWS,
    CORRECTED,
    USER_BOOTSTRAP,
    WELCH,
    Difference,
    bonferroni_level,
    corrected_paired,
    holm,
    interval,
    welch,
)

METRICS = ("age_acc", "age_1off", "gender_acc")
NAMES = {"age_acc": "age exact", "age_1off": "age 1-off", "gender_acc": "gender"}
CROPS = {"": "centre crop", "_10crop": "10-crop"}


Spread = Literal["se", "sd"]
# How a published "mean ± x" over n folds is read: x as the std over folds, or as its standard
# error (std / sqrt(n)), whence the std = x * sqrt(n).
SPREADS: dict[Spread, str] = {"sd": "std over folds", "se": "standard error (std = SE x √5)"}


@dataclass(frozen=True)
class Published:
    """A paper's mean ± x over n folds; `per_fold` (metric -> one value per fold 0..4, test part =
    metadata fold k) where the paper gives them, which makes the comparison a paired one."""

    name: str
    crop: str  # "" (single centre crop) or "_10crop" (over-sampling)
    values: dict[str, tuple[float, float]]  # metric -> (mean, ± as printed) over their n folds
    source: str
    n: int = 5
    per_fold: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def std(self, metric: str, spread: Spread) -> float:
        """Their std over folds under one reading of the printed ±."""
        x = self.values[metric][1]
        return x * math.sqrt(self.n) if spread == "se" else x


# Levi & Hassner, "Age and Gender Classification using Convolutional Neural Networks", CVPR
# workshops 2015: the gender table and the age table (exact and 1-off), 5-fold mean ± x. The
# numbers are confirmed by third-party listings (e.g. paperswithcode: 50.7 / 49.5 age, 86.8 / 85.9
# gender); the table numbers (2 = gender, 3 = age, or 3-4 as cited before) and whether the
# captions call ± a standard error were NOT verified here (the PDF could not be read), hence both
# readings are printed. They published no per-fold numbers.
LEVI_HASSNER = (
    Published(
        "Levi & Hassner 2015, over-sample",
        "_10crop",
        {"age_acc": (0.507, 0.051), "age_1off": (0.847, 0.022), "gender_acc": (0.868, 0.014)},
        "gender and age tables, 'Proposed using over-sample'",
    ),
    Published(
        "Levi & Hassner 2015, single crop",
        "",
        {"age_acc": (0.495, 0.044), "age_1off": (0.846, 0.017), "gender_acc": (0.859, 0.014)},
        "gender and age tables, 'Proposed using single crop'",
    ),
)
# As cited in the same tables ("Best from [10]"): not a CNN, not like for like; shown only.
EIDINGER = Published(
    "Eidinger et al. 2014, dropout-SVM",
    "",
    {"age_acc": (0.451, 0.026), "age_1off": (0.795, 0.014), "gender_acc": (0.778, 0.013)},
    "as cited in Levi & Hassner's tables",
)
THEIR_PROTOCOL = {
    "data": "Adience (real photos)",
    "split": "their published lists (test = metadata fold k)",
    "age labels": "the 8 exact group strings (17,321 labelled images)",
    "validation": "random 10 % of training rows (shares users with training)",
    "tested checkpoint": "not stated; assumption (released Caffe files): the last of "
    "max_iter 50000",
    "normalisation": "per-pixel mean image, 0-255, no std, computed once on the gender training "
    "LMDB and used for both nets; assumption (released Caffe files: mean_file, "
    "compute_image_mean)",
    "initialisation": "Gaussian N(0, 0.01) (Caffe fillers), from scratch",
    "training": "SGD, batch 50, lr 1e-3, 1e-4 after 10k (paper), 50k iterations (assumption: "
    "released Caffe solver, max_iter 50000)",
    "resize": "256 px images, 227 px crops; full decode, cv::resize bilinear, no antialiasing",
    "repeats": "1 run per fold",
    "model": "one net per task",
}
RESIZE_METHODS = {  # how the cache made its images (`cache.resize`)
    "antialias": "JPEG draft decoding, antialiased bilinear",
    "caffe": "full decode, bilinear without antialiasing (as cv::resize)",
}
CROP_THEIRS = {"": "single centre crop", "_10crop": "over-sample (4 corners + centre, mirrored)"}


Row = tuple[str, str, str, str]  # setting, ours, theirs, same | differs | unknown
AGE_LABELS = {  # distinct labelled images over the 5 metadata folds, counted on the real files
    "strict": ("strict: the 8 exact group strings (17,321 labelled images)", True),
    "lenient": (
        "lenient: also obvious variants and single ages (18,304 labelled images: a larger "
        "test set)",
        False,
    ),
}


def protocol(
    config: Config,
    image_size: int,
    synthetic: bool,
    seeds: int,
    pretrained_from: str | None = None,
    resize: Resize = "antialias",
) -> list[Row]:
    """The protocol rows: ours (from the config that trained the folds and the cache's
    `image_size` and `resize`) next to theirs. `pretrained_from`: the source a pretrained
    backbone learned on, where known."""
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
        "mean_image": "per-pixel mean image of each task's training rows, 0-255, no std",
        "channel_mean": "per-channel mean, 0-255, no std",
        "channel_mean_std": "per-channel mean and std",
    }[config.data.normalize]
    source = pretrained_from or "a larger face set"
    pretrained = config.model.init_from is not None
    norm_same: bool | str = config.data.normalize == "mean_image" and "same method, other rows"
    if pretrained:
        norm += f" (Adience's), while the backbone learned on {source}'s own: it changes here"
        norm_same = False
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
    if pretrained:
        init = f"backbone (conv1-3, fc6, fc7) pretrained on {source}, fresh heads ({init})"
        init += ", conv1-3 frozen" if config.model.freeze == "conv" else ""
    if config.model.norm != "lrn":
        init += ", batch norm instead of LRN"
    ages, ages_same = AGE_LABELS[s.age_policy]
    rows = [
        (
            "data",
            "SYNTHETIC images (agegender synth)" if synthetic else "Adience (real photos)",
            not synthetic,
        ),
        ("split", split, lists),
        ("age labels", ages, ages_same),
        ("validation", val, lists),
        (
            "tested checkpoint",
            "final iteration" if t.test_at == "final" else f"best validation {t.select_metric}",
            None,
        ),
        ("normalisation", norm, norm_same),
        (
            "initialisation",
            init,
            config.model.init == "caffe" and config.model.norm == "lrn" and not pretrained,
        ),
        (
            "training",
            f"{o.name.upper()}, batch {config.data.batch_size}, lr {o.lr:g} {sched}, {length}",
            paper_solver,
        ),
        (
            "resize",
            f"{image_size} px images, {config.data.crop} px crops; {RESIZE_METHODS[resize]}",
            image_size == 256 and config.data.crop == 227 and resize == "caffe",
        ),
        (
            "repeats",
            "1 run per fold" if seeds == 1 else f"{seeds} runs per fold, averaged per fold",
            seeds == 1,
        ),
        ("model", "see each row", None),
    ]
    verdict: dict[bool | None, str] = {True: "same", False: "differs", None: "not comparable"}
    return [
        (key, mine, THEIR_PROTOCOL[key], same if isinstance(same, str) else verdict[same])
        for key, mine, same in rows
    ]


def protocols(
    order: list[str],
    configs: dict[str, Config],
    image_size: int,
    synthetic: bool,
    seeds: int,
    pretrained_from: str | None = None,
    resize: Resize = "antialias",
) -> list[Row]:
    """The protocol of every compared variant, from its own config: one row where they agree,
    one per variant group (named in the setting) where they do not."""
    base = configs.get("multitask") or next(iter(configs.values()))
    each = {
        v: protocol(configs.get(v, base), image_size, synthetic, seeds, pretrained_from, resize)
        for v in order
    } or {"": protocol(base, image_size, synthetic, seeds, pretrained_from, resize)}
    rows: list[Row] = []
    for same_key in zip(*each.values(), strict=True):
        groups: dict[tuple[str, str], list[str]] = {}
        for v, (_, mine, _, same) in zip(each, same_key, strict=True):
            groups.setdefault((mine, same), []).append(v)
        key, their = same_key[0][0], same_key[0][2]
        if len(groups) == 1:
            rows.append(same_key[0])
            continue
        rows += [(f"{key} ({', '.join(vs)})", m, their, sm) for (m, sm), vs in groups.items()]
    return rows


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if np.isfinite(std) else f"{100 * mean:.1f}"


def _ci(t: dict[str, Any]) -> str:
    """The difference with its simultaneous interval (the one consistent with Holm)."""
    d: Difference = t["diff"]
    low, high = t["sim"]
    if not np.isfinite(low):
        return f"{100 * d.diff:+.1f} (CI undefined)"
    return f"{100 * d.diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def variant_description(variant: str) -> str:
    """What a variant is, in the tables' words (and in MLflow's descriptions)."""
    return {
        "age": "single-task (age), like theirs",
        "gender": "single-task (gender), like theirs",
        "multitask": "multi-task from scratch (one net, both heads)",
        "multitask_pretrained": "multi-task, backbone pretrained on a larger face set (the "
        "seed's second experiment; Levi & Hassner trained from scratch)",
    }.get(variant, variant)


def _heads(variant: str) -> tuple[str, ...]:
    return {"age": ("age_acc", "age_1off"), "gender": ("gender_acc",)}.get(variant, METRICS)


def summarize(
    aggregates: dict[str, dict[str, Any]],
    configs: dict[str, Config],
    image_size: int,
    synthetic: bool,
    title: str = "agegender",
    published_spread: Spread = "se",
    pretrained_from: str | None = None,
    resize: Resize = "antialias",
) -> dict[str, Any]:
    """Markdown tables and the numbers behind them (every test, with its Holm-adjusted p).
    `tests` hold the tests under the headline reading of published ± (`published_spread`),
    `tests_other_reading` those against published numbers under the other one."""
    vals = {v: a["values"] for v, a in aggregates.items()}
    folds = {v: a["folds"] for v, a in aggregates.items()}
    order = _order(vals)
    ours = protocols(
        order, configs, image_size, synthetic, _seeds(aggregates), pretrained_from, resize
    )
    other: Spread = "sd" if published_spread == "se" else "se"
    n_folds = max((len(f) for f in folds.values()), default=0)

    lines = _header(title, synthetic, n_folds)
    narrow = list(lines)
    tests: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    suffixes = [s for s in ("_10crop", "") if any(m + s in vals[v] for v in order for m in METRICS)]
    for number, suffix in suffixes_numbered(suffixes):
        lines += _crop_table(number, suffix, vals, order, ours, synthetic)
        narrow += _crop_table(number, suffix, vals, order, ours, synthetic, narrow=True)
        if not synthetic:
            tests += _published_tests(number, suffix, aggregates, order, published_spread)
            others += [
                t | {"key": f"{t['key']}_{other}"}
                for t in _published_tests(number, suffix, aggregates, order, other)
            ]
    pairs = _pairs(vals)
    # 10-crop only where both sides of every pair have it (a variant may lack it)
    sides = [side for va, ma, vb, mb in pairs for side in ((va, ma), (vb, mb))]
    primary = "_10crop" if all(f"{m}_10crop" in vals[v] for v, m in sides) else ""
    variant_tests = [_variant_test(aggregates, pair, primary) for pair in pairs]
    tests += variant_tests

    m_tests = int(sum(np.isfinite(t["diff"].p) for t in tests))
    level = bonferroni_level(m_tests)
    # each reading is its own family of the same m hypotheses: the variants' tests count in both
    for family in (tests, others + variant_tests):
        for t, p in zip(family, holm([t["diff"].p for t in family]), strict=True):
            t.setdefault("p_holm", p)
            t["sim"] = interval(t["diff"], level)
    published = [t for t in tests if t["table"] != "variants"]
    tail = _published_section(published, others, n_folds, m_tests, level, published_spread)
    tail += _variants_section(variant_tests, primary, m_tests, level)
    tail += _intervals_section(aggregates, order)
    return {
        "markdown": "\n".join(lines + tail),
        "narrow_markdown": "\n".join(narrow + tail),
        "protocol_markdown": protocol_markdown(order, ours, suffixes),
        "tests": [_flat(t, level) for t in tests],
        "tests_other_reading": [_flat(t, level) for t in others],
        "published_spread": published_spread,
        "synthetic": synthetic,
        "protocol": [list(r) for r in ours],
    }


def _flat(t: dict[str, Any], level: float) -> dict[str, Any]:
    """A test as plain numbers: `low`/`high` the unadjusted 95 % CI, `sim_*` the simultaneous."""
    low, high = t["sim"]
    d: Difference = t["diff"]
    kept = {k: v for k, v in t.items() if k not in ("diff", "sim")}
    return kept | d.as_dict() | {"sim_low": low, "sim_high": high, "sim_level": level}


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
    number: int,
    suffix: str,
    aggregates: dict[str, dict[str, Any]],
    order: list[str],
    spread: Spread,
    theirs: Published | None = None,
) -> list[dict[str, Any]]:
    """Paired over the folds where they published per-fold numbers (their test part of fold k
    is ours), else Welch from summary statistics with their ± read as `spread`."""
    theirs = theirs or _theirs(suffix)
    tests = []
    for v in order:
        values, folds = aggregates[v]["values"], aggregates[v]["folds"]
        for m in _heads(v):
            if m + suffix not in values:
                continue
            x = values[m + suffix]
            if m in theirs.per_fold:
                common = [k for k in folds if k < len(theirs.per_fold[m])]
                diff = corrected_paired(
                    [x[folds.index(k)] for k in common],
                    [theirs.per_fold[m][k] for k in common],
                    _ratio(aggregates, (v,)),
                )
                reading = "their per-fold numbers, paired"
            else:
                diff = welch(
                    float(np.mean(x)),
                    sample_std(x),
                    len(x),
                    theirs.values[m][0],
                    theirs.std(m, spread),
                    theirs.n,
                )
                reading = SPREADS[spread]
            tests.append(
                {
                    "key": f"{v}_{m}{suffix}_vs_levi_hassner",
                    "table": number,
                    "what": f"ours {v} − {theirs.name}",
                    "metric": NAMES[m] + f" ({CROPS[suffix]})",
                    "reading": reading,
                    "spread": spread,
                    "diff": diff,
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


def _published_section(
    tests: list[dict[str, Any]],
    others: list[dict[str, Any]],
    n_folds: int,
    m_tests: int,
    level: float,
    spread: Spread,
) -> list[str]:
    """Both readings of their ±, row by row, and why Welch is conservative here."""
    rows = []
    for t, o in zip(tests, others, strict=True):
        rows.append(
            _test_row(
                t,
                f"{t['reading']} (headline)" if t["reading"] in SPREADS.values() else t["reading"],
            )
        )
        if o["reading"] in SPREADS.values():
            rows.append(_test_row(o, o["reading"]))
    return _tests_section(
        "## Differences from Levi & Hassner (ours − theirs, points)",
        f"{WELCH}: our n = {n_folds} folds and std against their n = 5 and their ± read both "
        f"ways, each row naming its reading: as the std over folds, or as a standard error "
        f"(std = SE x √5). Headline: {SPREADS[spread]} (suite.published_spread={spread}); "
        "whether their captions call ± a standard error is not verified here. Our test part of "
        "fold k and their published test lists are the same rows (metadata fold k), but Welch "
        "treats the two sides as independent and so counts the fold-to-fold variance twice: "
        "conservative. A paired test needs their per-fold numbers, which Levi & Hassner did not "
        f"publish. {_interval_note(m_tests, level)} Holm-adjusted over the {m_tests} p-values "
        "of this summary, per reading.",
        "Welch; corrected t where paired"
        if any(t["diff"].test == CORRECTED for t in tests)
        else "Welch",
        rows,
        reading=True,
    )


def _interval_note(m_tests: int, level: float) -> str:
    """Says which intervals are printed, so none is read as agreeing with Holm when it does not."""
    return (
        f"Intervals: {100 * level:.1f} % simultaneous (Bonferroni over the {m_tests} tests), so "
        "one excludes 0 only where p (Holm) < 0.05 too; the unadjusted 95 % CIs are logged."
    )


def _variants_section(
    tests: list[dict[str, Any]], primary: str, m_tests: int, level: float
) -> list[str]:
    """States the correction and the crop, without which the p-values cannot be read."""
    return _tests_section(
        "## Our variants compared (A − B, points, same folds)",
        f"{CORRECTED}: the fold differences' variance is scaled by (1/k + n_test/n_train) "
        f"because the folds' training sets overlap; df = k − 1. On {CROPS[primary]} results. "
        f"{_interval_note(m_tests, level)} Holm-adjusted over the {m_tests} p-values of this "
        "summary ('-': undefined, no variance).",
        "corrected t",
        [_test_row(t) for t in tests],
    )


def _tests_section(
    heading: str, note: str, test: str, rows: list[str], reading: bool = False
) -> list[str]:
    """One layout for both kinds of test, so their tables read alike; none if nothing tested."""
    if not rows:
        return []
    head = "| comparison | metric | " + ("their ± read as | " if reading else "")
    return [
        heading,
        "",
        note,
        "",
        head + f"difference [simultaneous CI] | p ({test}) | p (Holm) |",
        "|---|---|" + ("---|" if reading else "") + "---|---|---|",
        *rows,
        "",
    ]


def _test_row(t: dict[str, Any], reading: str | None = None) -> str:
    d: Difference = t["diff"]
    p = "-" if not np.isfinite(d.p) else f"{d.p:.3g}"
    ph = "-" if not np.isfinite(t["p_holm"]) else f"{t['p_holm']:.3g}"
    cells = [t["what"], t["metric"], *([reading] if reading else []), _ci(t), p, ph]
    return "| " + " | ".join(cells) + " |"


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


def variant_table(
    values: dict[str, list[float]], intervals: dict[str, list[float]] | None = None
) -> str:
    """One variant's test metrics per fold, with mean and sample std (its parent's results.md),
    and each fold's user-clustered bootstrap interval where the folds logged one."""
    intervals = intervals or {}
    head = "| metric | mean | std (ddof=1) | folds |"
    lines = [head + (" per fold: 95 % CI |" if intervals else ""), "|---|---|---|---|"]
    lines[1] += "---|" if intervals else ""
    for k, v in values.items():
        row = (
            f"| test_{k} | {np.mean(v):.4f} | {sample_std(v):.4f} | "
            + ", ".join(f"{x:.3f}" for x in v)
            + " |"
        )
        if intervals:
            row += f" {_bounds(k, intervals)} |"
        lines.append(row)
    if intervals:
        lines += ["", f"95 % CI: {INTERVALS}."]
    return "\n".join(lines)


INTERVALS = f"{USER_BOOTSTRAP}, B = {BOOTSTRAP_DRAWS}, seeded per fold"


def is_interval(key: str) -> bool:
    """A bound of a fold's bootstrap interval (`age_acc_ci_low_10crop`), not a metric to
    average across folds."""
    return "_ci_low" in key or "_ci_high" in key


def _bounds(metric: str, intervals: dict[str, list[float]]) -> str:
    """Each fold's `[low, high]` of `metric` (`age_acc_10crop` -> `age_acc_ci_low_10crop`...)."""
    crop = "_10crop" if metric.endswith("_10crop") else ""
    base = metric.removesuffix(crop)
    low, high = intervals.get(f"{base}_ci_low{crop}"), intervals.get(f"{base}_ci_high{crop}")
    if low is None or high is None:
        return "-"
    return ", ".join(f"[{a:.3f}, {b:.3f}]" for a, b in zip(low, high, strict=True))


def _intervals_section(aggregates: dict[str, dict[str, Any]], order: list[str]) -> list[str]:
    """Each fold's test accuracy with its user-clustered interval: how far one fold's number
    can be trusted (a fold's test part can hold 100 faces of 33 users)."""
    rows = []
    for v in order:
        intervals = aggregates[v].get("intervals") or {}
        values, folds = aggregates[v]["values"], aggregates[v]["folds"]
        for suffix in ("_10crop", ""):
            for m in _heads(v):
                low = intervals.get(f"{m}_ci_low{suffix}")
                high = intervals.get(f"{m}_ci_high{suffix}")
                if m + suffix not in values or low is None or high is None:
                    continue
                cells = ", ".join(
                    f"{k}: {100 * x:.1f} [{100 * a:.1f}, {100 * b:.1f}]"
                    for k, x, a, b in zip(folds, values[m + suffix], low, high, strict=True)
                )
                rows.append(f"| ours: {v} | {NAMES[m]} ({CROPS[suffix]}) | {cells} |")
    if not rows:
        return []
    return [
        "## Per-fold test accuracy (%) with 95 % intervals",
        "",
        f"{INTERVALS}: the faces of one user are not independent, so the user is the unit "
        "resampled. Unadjusted, one interval per fold; they say how precise one fold's number "
        "is, not whether two models differ.",
        "",
        "| model | metric | fold: accuracy [95 % CI] |",
        "|---|---|---|",
        *rows,
        "",
    ]
