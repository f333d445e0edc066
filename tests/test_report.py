"""The summary tables: like for like, protocols stated, the statistics the README promises."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agegender import report
from agegender.config import Config, SuiteConfig, Variant, load_config
from agegender.metrics import sample_std
from agegender.report import LEVI_HASSNER, Published, Spread, summarize, variant_table
from agegender.stats import CORRECTED, corrected_paired, holm, welch

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
    # 10-crop next to over-sampled, centre crop next to single crop (their gender, age tables)
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
        "| normalisation | per-pixel mean image of each task's training rows, 0-255, no std | "
        "per-pixel mean image, 0-255, no std, computed once on the gender training LMDB and used "
        "for both nets; assumption (released Caffe files: mean_file, compute_image_mean) | "
        "same method, other rows |",
        "| split | subject-disjoint (test = metadata fold k) | their published lists",
        "| resize | 256 px images, 227 px crops; JPEG draft decoding, antialiased bilinear | "
        "256 px images, 227 px crops; full decode, cv::resize bilinear, no antialiasing "
        "| differs |",
        "| crop mode | 10-crop | over-sample (4 corners + centre, mirrored) | same |",
        "| crop mode | centre crop | single centre crop | same |",
    )
    assert _row(md, "| training |")[3] == "same"
    assert _row(md, "| validation |")[3] == "differs"

    tests = {t["key"]: t for t in out["tests"]}
    # vs published: Welch from summary statistics, n = 5 a side, their ± read as a standard
    # error by default (std = 0.051 x sqrt 5)
    t = tests["age_age_acc_10crop_vs_levi_hassner"]
    ref = welch(float(np.mean(age10)), sample_std(age10), 5, 0.507, 0.051 * math.sqrt(5), 5)
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
    low, high = d["sim_low"], d["sim_high"]  # simultaneous, at 1 - 0.05 / 15
    assert d["sim_level"] == pytest.approx(1 - 0.05 / 15)
    assert row[2] == "standard error (std = SE x √5) (headline)"
    assert row[3] == f"{100 * d['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    assert row[4:] == [f"{d['p']:.3g}", f"{d['p_holm']:.3g}"]


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
        "| resize | 72 px images, 64 px crops; JPEG draft decoding, antialiased bilinear |",
    )
    assert _row(md, "| normalisation |")[3] == "differs"
    assert _row(md, "| training |")[3] == "differs"


def test_resize_row_names_the_method_and_is_same_only_for_caffe_at_256() -> None:
    theirs = "256 px images, 227 px crops; full decode, cv::resize bilinear, no antialiasing"
    caffe = "full decode, bilinear without antialiasing (as cv::resize)"
    md = summarize(AGGREGATES, _configs(Config()), 256, synthetic=True, resize="caffe")["markdown"]
    assert f"| resize | 256 px images, 227 px crops; {caffe} | {theirs} | same |" in md
    md = summarize(AGGREGATES, _configs(Config()), 72, synthetic=True, resize="caffe")["markdown"]
    assert f"| resize | 72 px images, 227 px crops; {caffe} | {theirs} | differs |" in md


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


def _age_only(values: list[float]) -> dict[str, Any]:
    return {"age": {"folds": FOLDS, "values": {"age_acc_10crop": values}}}


def test_both_readings_of_their_spread_are_printed_with_hand_computed_welch() -> None:
    """Ours 48.0 ± 4.0 (points) against their 50.7 ± 5.1, over-sampled age, one test, so the
    intervals are plain 95 % ones. Their ± as a std: se = sqrt(16/5 + 26.01/5) = 2.89862,
    t = -0.93148, df = 7.57020, p = 0.380, 95 % half-width 6.7509. As a standard error: their
    std = 5.1 x sqrt 5, se = sqrt(3.2 + 26.01) = 5.40463, t = -0.49957, df = 853.2241 / 171.690
    = 4.96956, p = 0.639, half-width 13.9187. (scipy's ttest_ind_from_stats agrees.)"""
    aggregates = _age_only([0.44, 0.44, 0.48, 0.52, 0.52])  # mean 0.48, sample std 0.04
    readings: tuple[tuple[Spread, Spread], ...] = (("se", "sd"), ("sd", "se"))
    for spread, other in readings:
        out = summarize(
            aggregates, _configs(Config()), 256, synthetic=False, published_spread=spread
        )
        md = out["markdown"]
        head = "| ours age − Levi & Hassner 2015, over-sample | age exact (10-crop) | "
        rows = {
            "sd": head + "std over folds{} | -2.7 [-9.5, +4.1] | 0.38 | 0.38 |",
            "se": head + "standard error (std = SE x √5){} | -2.7 [-16.6, +11.2] | 0.639 | 0.639 |",
        }
        _has_lines(md, rows[spread].format(" (headline)"), rows[other].format(""))
        assert f"suite.published_spread={spread}" in md
        (headline,) = out["tests"]
        (second,) = out["tests_other_reading"]
        assert headline["key"] == "age_age_acc_10crop_vs_levi_hassner"
        assert second["key"] == f"age_age_acc_10crop_vs_levi_hassner_{other}"
        df = {"sd": 7.57020, "se": 4.96956}
        assert (headline["df"], second["df"]) == pytest.approx((df[spread], df[other]), abs=1e-5)
    assert "the same rows (metadata fold k)" in md
    assert "counts the fold-to-fold variance twice: conservative" in md
    assert "Levi & Hassner did not publish" in md
    assert all(not p.per_fold for p in LEVI_HASSNER)  # they published no per-fold numbers


def test_published_per_fold_numbers_are_paired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-made per-fold numbers: d = ours - theirs = [.02, .02, .01, .01, .04], mean 0.02,
    var (ddof 1) 0.0006 / 4 = 1.5e-4; corrected se = sqrt((1/5 + 0.25) x 1.5e-4) = 0.0082158,
    t = 2.43432, df = 4 (n_test / n_train = 0.25 from the logged sizes)."""
    theirs = Published(
        "paper P",
        "_10crop",
        {"age_acc": (0.47, 0.02), "age_1off": (0.8, 0.02), "gender_acc": (0.8, 0.02)},
        "its table",
        per_fold={"age_acc": (0.48, 0.50, 0.46, 0.44, 0.47)},
    )
    monkeypatch.setattr(report, "LEVI_HASSNER", (theirs,))
    aggregates = _age_only([0.50, 0.52, 0.47, 0.45, 0.51])
    aggregates["age"]["sizes"] = {"n_train": [12_000.0] * 5, "n_test": [3_000.0] * 5}
    out = summarize(aggregates, _configs(Config()), 256, synthetic=False)
    (t,) = out["tests"]
    assert t["test"] == CORRECTED
    assert (t["diff"], t["t"], t["df"]) == pytest.approx((0.02, 2.43432, 4), abs=1e-5)
    row = _row(out["markdown"], "| ours age − paper P | age exact (10-crop) |")
    assert row[2] == "their per-fold numbers, paired"
    assert "| p (Welch; corrected t where paired) | p (Holm) |" in out["markdown"]
    assert out["markdown"].count("| ours age − paper P |") == 1  # no second reading to print


def test_protocol_rows_per_variant() -> None:
    """Each compared variant's protocol from its own config: the pretrained rows say where their
    backbone and its normalisation come from; the age-label policy is a row of its own."""
    base = load_config(None, ["data.split.age_policy=lenient"])
    suite = SuiteConfig(variants=("multitask", "multitask_pretrained"), pretrained="x/best.pt")
    configs = {
        "multitask": suite.variant_config(base, "multitask"),
        "multitask_pretrained": suite.variant_config(
            base, "multitask_pretrained", Path("x/best.pt")
        ),
    }
    mt = AGGREGATES["multitask"]
    out = summarize(
        {"multitask": mt, "multitask_pretrained": mt},
        configs,
        256,
        synthetic=True,
        pretrained_from="CelebA",
    )
    theirs_init = "Gaussian N(0, 0.01) (Caffe fillers), from scratch"
    _has_lines(
        out["markdown"],
        f"| initialisation (multitask) | Gaussian (Caffe fillers) | {theirs_init} | same |",
        "| initialisation (multitask_pretrained) | backbone (conv1-3, fc6, fc7) pretrained on "
        f"CelebA, fresh heads (Gaussian (Caffe fillers)) | {theirs_init} | differs |",
        "| normalisation (multitask_pretrained) | per-pixel mean image of each task's training "
        "rows, 0-255, no std (Adience's), while the backbone learned on CelebA's own: it changes "
        "here |",
        "| age labels | lenient: also obvious variants and single ages (18,304 labelled images: a "
        "larger test set) | the 8 exact group strings (17,321 labelled images) | differs |",
        "(the seed's second experiment; Levi & Hassner trained from scratch)",
    )
    assert _row(out["markdown"], "| normalisation (multitask_pretrained) |")[3] == "differs"
    assert _row(out["markdown"], "| training |")[3] == "same"  # one row where they agree
    assert ["initialisation (multitask)", "Gaussian (Caffe fillers)", theirs_init, "same"] in out[
        "protocol"
    ]


def test_intervals_agree_with_holm() -> None:
    """multitask - gender: d = [.01, .03, .02, .04, .025], mean 0.025, var 1.25e-4, corrected se
    = sqrt(0.45 x 1.25e-4) = 0.0075, t = 3.333, df 4, p = 0.0290: its unadjusted 95 % CI
    (0.025 ± 2.7764 x 0.0075 = [+0.4, +4.6] points) excludes 0, but Holm over the 3 tests gives
    0.087. The printed interval is the simultaneous one at 1 - 0.05 / 3 (t quantile 3.9608):
    0.025 ± 0.0297 = [-0.5, +5.5] points, which does not exclude 0."""
    gender = AGGREGATES["gender"]["values"]["gender_acc"]
    multi = [g + 0.01 + d for g, d in zip(gender, [0.01, 0.03, 0.02, 0.04, 0.025], strict=True)]
    mt = AGGREGATES["multitask"]
    aggregates = AGGREGATES | {
        "multitask": mt | {"values": mt["values"] | {"gender_acc_10crop": multi}}
    }
    out = summarize(aggregates, _configs(Config()), 256, synthetic=True)
    t = next(x for x in out["tests"] if x["key"] == "multitask_vs_gender_gender_acc_10crop")
    assert t["p"] == pytest.approx(0.0290154, abs=1e-6)
    assert t["low"] > 0  # the unadjusted interval excludes 0 ...
    assert t["p_holm"] == pytest.approx(3 * 0.0290154, abs=1e-6)  # ... p (Holm) does not
    assert (t["sim_low"], t["sim_high"]) == pytest.approx((0.025 - 0.0297059, 0.025 + 0.0297059))
    row = _row(out["markdown"], "| multitask − gender | gender (10-crop) |")
    assert row[2:] == ["+2.5 [-0.5, +5.5]", "0.029", "0.087"]
    _has_lines(
        out["markdown"],
        "| comparison | metric | difference [simultaneous CI] | p (corrected t) | p (Holm) |",
        "Intervals: 98.3 % simultaneous (Bonferroni over the 3 tests), so one excludes 0 only "
        "where p (Holm) < 0.05 too",
    )


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
