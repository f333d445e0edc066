"""The summary tables: like for like, protocols stated, the statistics the README promises."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agegender.config import Config, SuiteConfig, Variant, load_config
from agegender.metrics import sample_std
from agegender.report import summarize, variant_table
from agegender.stats import corrected_paired, holm, welch

FOLDS = [0, 1, 2, 3, 4]


def _aggregate(centre: dict[str, list[float]], shift: float = 0.01) -> dict[str, Any]:
    values = dict(centre) | {f"{m}_10crop": [v + shift for v in x] for m, x in centre.items()}
    sizes = {"n_train": [12_000.0] * 5, "n_test": [3_000.0] * 5, "seeds": [1.0] * 5}
    return {"folds": FOLDS, "values": values, "sizes": sizes}


AGGREGATES = {
    "age": _aggregate({"age_acc": [0.45, 0.52, 0.47, 0.40, 0.50], "age_1off": [0.8] * 4 + [0.9]}),
    "gender": _aggregate({"gender_acc": [0.84, 0.86, 0.85, 0.83, 0.88]}),
    "multitask": _aggregate(
        {
            "age_acc": [0.46, 0.50, 0.49, 0.41, 0.52],
            "age_1off": [0.82, 0.85, 0.84, 0.80, 0.88],
            "gender_acc": [0.85, 0.87, 0.85, 0.84, 0.89],
        }
    ),
}


def _configs(config: Config) -> dict[str, Config]:
    variants: tuple[Variant, ...] = ("age", "gender", "multitask")
    suite = SuiteConfig(variants=variants)
    return {v: suite.variant_config(config, v) for v in variants}


def _row(markdown: str, start: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def _has_lines(markdown: str, *lines: str) -> None:
    for line in lines:
        assert line in markdown, line


def test_real_data_like_for_like_with_welch_corrected_t_and_holm() -> None:
    out = summarize(AGGREGATES, _configs(Config()), 256, synthetic=False, title="t")
    md = out["markdown"]
    assert "SYNTHETIC" not in md.splitlines()[0]
    t1, t2 = md.index("## Table 1. Ours, 10-crop"), md.index("## Table 2. Ours, centre crop")
    # 10-crop next to over-sampled, centre crop next to single crop (their Tables 3-4)
    assert (
        "| Levi & Hassner 2015, over-sample | one net per task | 50.7 ± 5.1 | 84.7 ± 2.2 | 86.8"
        in (md[t1:t2])
    )
    assert (
        "| Levi & Hassner 2015, single crop | one net per task | 49.5 ± 4.4 | 84.6 ± 1.7 | 85.9"
        in (md[t2:])
    )
    age10 = [x + 0.01 for x in AGGREGATES["age"]["values"]["age_acc"]]
    cells = _row(md[t1:t2], "| ours: age |")
    assert cells[2] == f"{100 * np.mean(age10):.1f} ± {100 * sample_std(age10):.1f}"
    assert cells[4] == "-"  # a single-task age net has no gender number
    # the protocol is in the table, with what differs
    _has_lines(
        md,
        "| normalisation | per-pixel mean image, 0-255, no std | per-pixel mean image, 0-255, "
        "no std | same |",
        "| split | subject-disjoint (test = metadata fold k) | their published lists",
        "| resize | 256 px images, 227 px crops | 256 px images, 227 px crops | same |",
        "| crop mode | 10-crop | over-sample (4 corners + centre, mirrored) | same |",
        "| crop mode | centre crop | single centre crop | same |",
    )
    assert _row(md, "| training |")[3] == "same"
    assert _row(md, "| validation |")[3] == "differs"

    tests = {t["key"]: t for t in out["tests"]}
    # vs published: Welch from summary statistics, n = 5 a side, their std
    t = tests["age_age_acc_10crop_vs_levi_hassner"]
    ref = welch(float(np.mean(age10)), sample_std(age10), 5, 0.507, 0.051, 5)
    assert (t["p"], t["low"], t["high"]) == pytest.approx((ref.p, ref.low, ref.high))
    assert t["test"].startswith("Welch")
    # between variants: the corrected resampled t with n_test / n_train = 0.25
    t = tests["multitask_vs_gender_gender_acc_10crop"]
    a = [x + 0.01 for x in AGGREGATES["multitask"]["values"]["gender_acc"]]
    b = [x + 0.01 for x in AGGREGATES["gender"]["values"]["gender_acc"]]
    assert t["p"] == pytest.approx(corrected_paired(a, b, 0.25).p)
    # Holm over every p-value of the summary: 2 crops x (2 age + 1 gender + 3 multitask) + 3
    assert len(tests) == 15
    raw = [x["p"] for x in out["tests"]]
    assert [x["p_holm"] for x in out["tests"]] == pytest.approx(holm(raw))
    assert "Holm-adjusted over the 15 p-values of this summary" in md
    row = _row(md, "| ours age − Levi & Hassner 2015, over-sample | age exact (10-crop)")
    d = tests["age_age_acc_10crop_vs_levi_hassner"]
    assert row[2] == f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    assert row[3:] == [f"{d['p']:.3g}", f"{d['p_holm']:.3g}"]


def test_synthetic_data_are_never_set_against_published_numbers() -> None:
    out = summarize(AGGREGATES, _configs(Config()), 256, synthetic=True, title="t")
    md = out["markdown"]
    assert "SYNTHETIC DATA" in md.splitlines()[0]
    for published in ("50.7", "49.5", "86.8", "85.9", "Eidinger", "Welch", "over-sample |"):
        assert f"{published}" not in md.replace("over-sample (4 corners", ""), published
    assert all("levi_hassner" not in t["key"] for t in out["tests"])
    assert len(out["tests"]) == 3  # only the comparisons between our variants
    assert "| data | SYNTHETIC images (agegender synth) | Adience (real photos) | differs |" in md


def test_protocol_rows_follow_the_config() -> None:
    modern = load_config(None, ["data.crop=64"], preset="modern")
    md = summarize(AGGREGATES, _configs(modern), 72, synthetic=True)["markdown"]
    _has_lines(
        md,
        "| normalisation | per-channel mean and std |",
        "| initialisation | PyTorch default, batch norm instead of LRN |",
        "| tested checkpoint | best validation loss |",
        "| resize | 72 px images, 64 px crops |",
    )
    assert _row(md, "| normalisation |")[3] == "differs"
    assert _row(md, "| training |")[3] == "differs"


def test_variants_are_compared_on_a_crop_both_sides_have() -> None:
    """A single-task variant tested on centre crops only, the multitask net on both: the
    comparison falls back to centre crops for every pair (one crop per table, never mixed)."""
    age = AGGREGATES["age"]
    centre_only = {k: v for k, v in age["values"].items() if not k.endswith("_10crop")}
    aggregates = AGGREGATES | {"age": age | {"values": centre_only}}
    out = summarize(aggregates, _configs(Config()), 256, synthetic=True, title="t")
    keys = sorted(t["key"] for t in out["tests"])
    assert keys == [
        "multitask_vs_age_age_1off",
        "multitask_vs_age_age_acc",
        "multitask_vs_gender_gender_acc",
    ]
    assert "On centre crop results." in out["markdown"]


INTERVALS = {
    "gender_acc_ci_low": [0.80, 0.79, 0.81, 0.78, 0.84],
    "gender_acc_ci_high": [0.88, 0.92, 0.89, 0.88, 0.92],
}


def test_fold_intervals_in_the_summary_and_the_variant_table() -> None:
    """Each fold's user-clustered interval is printed next to its accuracy, with the method, in
    the summary and the variant's results table; none is averaged across folds or tested."""
    gender = AGGREGATES["gender"] | {"intervals": INTERVALS}
    out = summarize(AGGREGATES | {"gender": gender}, _configs(Config()), 256, False, title="t")
    _has_lines(
        out["markdown"],
        "## Per-fold test accuracy (%) with 95 % intervals",
        "user-clustered percentile bootstrap (test users resampled with replacement), B = 2000, "
        "seeded per fold: the faces of one user are not independent",
        "| ours: gender | gender (centre crop) | 0: 84.0 [80.0, 88.0], 1: 86.0 [79.0, 92.0], "
        "2: 85.0 [81.0, 89.0], 3: 83.0 [78.0, 88.0], 4: 88.0 [84.0, 92.0] |",
    )
    assert "(10-crop) | 0:" not in out["markdown"]  # no 10-crop bounds given, none printed
    plain = summarize(AGGREGATES, _configs(Config()), 256, False, title="t")
    assert out["tests"] == plain["tests"]  # the intervals add no test to Holm's family
    table = variant_table(gender["values"], INTERVALS).splitlines()
    assert table[0] == "| metric | mean | std (ddof=1) | folds | per fold: 95 % CI |"
    assert table[2] == (
        "| test_gender_acc | 0.8520 | 0.0192 | 0.840, 0.860, 0.850, 0.830, 0.880 | "
        "[0.800, 0.880], [0.790, 0.920], [0.810, 0.890], [0.780, 0.880], [0.840, 0.920] |"
    )
    assert table[3].endswith("| - |")  # gender_acc_10crop: no bounds logged
    assert table[-1].startswith("95 % CI: user-clustered percentile bootstrap")
    assert variant_table(gender["values"]).splitlines()[0] == (
        "| metric | mean | std (ddof=1) | folds |"
    )
