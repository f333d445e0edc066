from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agegender.adience import MetadataError, Table, read_metadata
from agegender.config import SplitConfig
from agegender.splits import make_split
from tests.conftest import run_cli

# The README table of the published lists: (age train, val, test, gender train, val, test).
LH_SIZES = {
    0: (11823, 1284, 4316, 12256, 1339, 4007),
    1: (12894, 1428, 3101, 12574, 1404, 3624),
    2: (12655, 1429, 3339, 12986, 1425, 3191),
    3: (12991, 1457, 2975, 12854, 1430, 3318),
    4: (12371, 1359, 3693, 12717, 1422, 3463),
}


@pytest.fixture(scope="module")
def table(real_metadata: Path) -> Table:
    return read_metadata(real_metadata)


@pytest.mark.parametrize("fold", range(5))
def test_subject_disjoint_is_disjoint_and_tests_on_fold_k(table: Table, fold: int) -> None:
    split = make_split(table, fold)
    assert split.shared_users(table) == {"train-val": 0, "train-test": 0, "val-test": 0}
    labelled = split.labels.age_mask | split.labels.gender_mask
    fold_rows = np.flatnonzero((table.folds == fold) & labelled)
    np.testing.assert_array_equal(split.test.rows, fold_rows)
    np.testing.assert_array_equal(split.test.age, fold_rows[split.labels.age_mask[fold_rows]])
    # train + val = every labelled row of the other four folds, each exactly once
    rest = np.flatnonzero((table.folds != fold) & labelled)
    np.testing.assert_array_equal(np.sort(np.concatenate([split.train.rows, split.val.rows])), rest)
    # ~10 % of the other folds' users (a user with no labelled row has no rows in any part)
    others = {u for u, k in zip(table.users, table.folds, strict=True) if k != fold}
    val_users = {table.users[i] for i in split.val.rows}
    assert round(0.1 * len(others)) - 1 <= len(val_users) <= round(0.1 * len(others))
    assert 0.05 < len(split.val.rows) / len(rest) < 0.15


def test_subject_disjoint_is_seeded(table: Table) -> None:
    a, b = make_split(table, 2), make_split(table, 2)
    np.testing.assert_array_equal(a.val.rows, b.val.rows)
    c = make_split(table, 2, SplitConfig(seed=1))
    assert set(c.val.rows.tolist()) != set(a.val.rows.tolist())
    assert make_split(table, 2, SplitConfig(age_policy="lenient")).train.age.size > a.train.age.size


@pytest.mark.parametrize("fold", range(5))
def test_levi_hassner_lists_as_published(table: Table, lh_lists: Path, fold: int) -> None:
    split = make_split(table, fold, SplitConfig(protocol="levi_hassner", lists=lh_lists))
    sizes = tuple(
        len(getattr(split.part(p), t)) for t in ("age", "gender") for p in ("train", "val", "test")
    )
    assert sizes == LH_SIZES[fold]
    shared = split.shared_users(table)
    assert shared["train-val"] > 100
    assert shared["train-test"] == shared["val-test"] == 0
    assert "shares" in split.notes[0]


@pytest.mark.integration
def test_data_split_cli(real_metadata: Path, lh_lists: Path) -> None:
    res = run_cli("data", "split", "--metadata", real_metadata, "--fold", "3", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["shared_users"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    res = run_cli(
        "data",
        "split",
        "--metadata",
        real_metadata,
        "--fold",
        "3",
        "--protocol",
        "levi_hassner",
        "--lists",
        lh_lists,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert (d["train"]["age"], d["val"]["age"], d["test"]["gender"]) == (12991, 1457, 3318)
    assert d["shared_users"]["train-val"] > 0
    assert "validation list shares" in res.stderr  # said in the output, not only in the docs


def test_levi_hassner_label_mismatch_is_reported(
    table: Table, lh_lists: Path, tmp_path: Path
) -> None:
    lists = tmp_path / "lists"
    for src in (lh_lists / "test_fold_is_0").iterdir():
        dst = lists / "test_fold_is_0" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    path = lists / "test_fold_is_0" / "gender_val.txt"
    lines = path.read_text().splitlines()
    image, label = lines[4].split()
    lines[4] = f"{image} {1 - int(label)}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"gender_val.txt, line 5: gender label \d disagrees"):
        make_split(table, 0, SplitConfig(protocol="levi_hassner", lists=lists))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="needs `lists`"):
        SplitConfig(protocol="levi_hassner")
    with pytest.raises(ValidationError, match="val_fraction"):
        SplitConfig(val_fraction=1.5)
    with pytest.raises(ValidationError, match="protocol"):
        SplitConfig(protocol="random")
