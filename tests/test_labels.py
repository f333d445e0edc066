from __future__ import annotations

from itertools import pairwise

import pytest

from agegender.labels import (
    AGE_GROUPS,
    AGE_RANGES,
    LENIENT_EXTRA,
    LEVI_HASSNER_AGE_STRINGS,
    NO_LABEL,
    age_group_of_years,
    age_label,
    gender_label,
)


def test_strict_accepts_exactly_the_eight_group_strings() -> None:
    assert [age_label(s) for s in LEVI_HASSNER_AGE_STRINGS] == list(range(8))
    assert AGE_GROUPS[age_label("(8, 12)")] == "8-13"  # how the metadata spells it
    assert age_label("(8, 13)") == age_label("(8, 12)") == 2  # the seed's spelling works too
    for s in ["(25, 23)", "(27, 32)", "(38, 42)", "35", "3", "None", "", "(38, 48)", "13"]:
        assert age_label(s) == NO_LABEL, s


@pytest.mark.parametrize(
    ("string", "group"),
    [
        ("(25, 23)", "25-32"),
        ("(27, 32)", "25-32"),
        ("(38, 42)", "38-43"),
        ("2", "0-2"),
        ("13", "8-13"),
        ("22", "15-20"),
        ("23", "25-32"),
        ("29", "25-32"),
        ("32", "25-32"),
        ("34", "25-32"),
        ("36", "38-43"),
        ("42", "38-43"),
        ("45", "38-43"),
        ("46", "48-53"),
        ("55", "48-53"),
        ("56", "48-53"),
        ("57", "60-100"),
        ("58", "60-100"),
        ("(60, 100)", "60-100"),
        ("(8, 12)", "8-13"),
    ],
)
def test_lenient_table(string: str, group: str) -> None:
    assert AGE_GROUPS[age_label(string, "lenient")] == group


@pytest.mark.parametrize("string", ["3", "35", "(38, 48)", "(8, 23)", "None", "", "x"])
def test_lenient_leaves_ambiguous_strings_unlabelled(string: str) -> None:
    assert age_label(string, "lenient") == NO_LABEL


def test_lenient_single_ages_lie_in_or_next_to_their_group() -> None:
    for string, group in LENIENT_EXTRA.items():
        if string.isdigit():
            assert age_group_of_years(int(string)) == group, string


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown age policy 'loose'"):
        age_label("(0, 2)", "loose")  # type: ignore[arg-type]


def test_age_ranges_name_the_groups() -> None:
    assert [f"{lo}-{hi}" for lo, hi in AGE_RANGES] == list(AGE_GROUPS)
    assert all(a[1] < b[0] for a, b in pairwise(AGE_RANGES))


def test_gender() -> None:
    assert (gender_label("m"), gender_label("f")) == (0, 1)
    assert gender_label("u") == gender_label("") == gender_label(" ") == NO_LABEL
