from __future__ import annotations

import json
from pathlib import Path

import pytest

from agegender.adience import COLUMNS, MetadataError, read_fold, read_list, read_metadata, stats
from tests.conftest import run_cli

HEADER = "\t".join(COLUMNS)
ROW = "30601258@N03\t10399646885_67c7d20df9_o.jpg\t1\t(25, 32)\tf\t0\t414\t1086\t1383\t-115\t30\t17"

# The figures the data layer must reproduce on the real metadata (issue 2, strict policy).
REAL_TOTAL = {
    "rows": 19370,
    "duplicates": 117,
    "age_labelled": 17321,
    "gender_labelled": 17492,
    "both_labelled": 16156,
    "users": 168,
}
REAL_FOLD_ROWS = [4484, 3730, 3894, 3446, 3816]


def test_real_metadata_stats(real_metadata: Path) -> None:
    s = stats(read_metadata(real_metadata))
    assert {k: s["total"][k] for k in REAL_TOTAL} == REAL_TOTAL
    assert [s["folds"][str(k)]["rows"] for k in range(5)] == REAL_FOLD_ROWS
    assert sum(s["total"]["age_groups"].values()) == REAL_TOTAL["age_labelled"]
    # The 8-13 group exists (the seed lost it by looking for "(8, 13)").
    assert s["total"]["age_groups"]["8-13"] == 2124
    assert sum(f["users"] for f in s["folds"].values()) == 168  # folds are user-disjoint


def test_lenient_policy_labels_more_rows(real_metadata: Path) -> None:
    table = read_metadata(real_metadata)
    strict, lenient = stats(table, "strict")["total"], stats(table, "lenient")["total"]
    assert lenient["gender_labelled"] == strict["gender_labelled"]
    # 18304 = 17321 + the README's counts of the lenient strings, minus their duplicate rows.
    assert lenient["age_labelled"] == 18304


@pytest.mark.integration
def test_data_stats_cli_matches(real_metadata: Path) -> None:
    res = run_cli("data", "stats", "--metadata", real_metadata, "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert {k: s["total"][k] for k in REAL_TOTAL} == REAL_TOTAL
    assert [s["folds"][str(k)]["rows"] for k in range(5)] == REAL_FOLD_ROWS


def _fold(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    path = tmp_path / "fold_0_data.txt"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    other = ROW.replace("\t1\t", "\t2\t", 1)
    rows, dups = read_fold(_fold(tmp_path, ROW, other, ROW, ROW), 0)
    assert dups == 2
    assert [r.face_id for r in rows] == [1, 2]
    assert rows[0].path == "30601258@N03/landmark_aligned_face.1.10399646885_67c7d20df9_o.jpg"
    assert rows[0].source == "fold_0_data.txt:2"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (ROW.rsplit("\t", 1)[0], "expected 12 tab-separated columns, found 11"),
        (ROW.replace("\t1\t", "\tone\t", 1), "column 'face_id' must be an integer, got 'one'"),
        (ROW.replace("\t414\t", "\t4.5x\t", 1), "column 'y' must be an integer"),
        ("\t" + ROW.split("\t", 1)[1], "column 'user_id' must be a non-empty"),
    ],
)
def test_malformed_row_names_file_line_and_problem(tmp_path: Path, line: str, problem: str) -> None:
    path = _fold(tmp_path, ROW, ROW.replace("\t1\t", "\t7\t", 1), line)
    with pytest.raises(MetadataError) as exc:
        read_fold(path, 0)
    assert exc.value.line == 4
    assert str(exc.value).startswith(f"{path}, line 4: ")
    assert problem in str(exc.value)


def test_bad_header_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"line 1: unexpected header"):
        read_fold(_fold(tmp_path, ROW, header=HEADER.replace("gender", "sex")), 0)
    with pytest.raises(MetadataError, match=r"fold_3_data.txt: file not found"):
        read_metadata(tmp_path, folds=[3])


def test_list_reader_rejects_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "age_train.txt"
    path.write_text("u/landmark_aligned_face.1.a.jpg 3\nu/landmark_aligned_face.2.b.jpg\n")
    with pytest.raises(MetadataError, match=r"age_train.txt, line 2: expected '<image path>"):
        read_list(path)
    path.write_text("u/landmark_aligned_face.1.a.jpg 3\n\n")
    assert [(e.path, e.label, e.line) for e in read_list(path)] == [
        ("u/landmark_aligned_face.1.a.jpg", 3, 1)
    ]
