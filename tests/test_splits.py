from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agegender.adience import MetadataError, Row, Table, read_metadata
from agegender.config import SplitConfig
from agegender.labels import AGE_GROUPS, GENDERS, LEVI_HASSNER_AGE_STRINGS
from agegender.splits import Split, distribution_line, make_split
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


def _random_val(config: SplitConfig) -> SplitConfig:
    """The same config with stratification off (model_copy works on the frozen model)."""
    return config.model_copy(update={"stratify": False})


def _tv(split: Split, task: str = "age") -> float:
    """Total-variation distance between the validation and training label distributions."""
    key = "age_groups" if task == "age" else "genders"
    val, train = (
        np.array(list(split.label_counts(p)[key].values()), float) for p in ("val", "train")
    )
    return float(0.5 * np.abs(val / val.sum() - train / train.sum()).sum())


def _val_share(split: Split) -> float:
    return len(split.val.rows) / (len(split.val.rows) + len(split.train.rows))


def _val_users(table: Table, split: Split) -> set[str]:
    return {table.users[i] for i in split.val.rows}


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
    for config in (SplitConfig(), _random_val(SplitConfig())):
        d, e = make_split(table, 2, config), make_split(table, 2, config)
        np.testing.assert_array_equal(d.val.rows, e.val.rows)
        np.testing.assert_array_equal(d.train.rows, e.train.rows)


def test_stratified_validation_matches_training(table: Table) -> None:
    """On the real metadata a random 10 % of users is far from training's age mix (TV 0.27-0.48
    at seed 0); the stratified choice is within 0.04 on every fold, with as many users and a 10 %
    row share. Measured (seed 0) age TV random -> stratified: fold 0 0.398 -> 0.025,
    1 0.267 -> 0.012, 2 0.297 -> 0.012, 3 0.483 -> 0.017, 4 0.320 -> 0.038 (mean 0.353 -> 0.021);
    the bounds below leave room for numeric noise, not for a weaker search."""
    random_tv, strat_tv = [], []
    for fold in range(5):
        strat = make_split(table, fold)
        rand = make_split(table, fold, _random_val(SplitConfig()))
        assert strat.summary(table)["stratified"] is True
        assert rand.summary(table)["stratified"] is False
        random_tv.append(_tv(rand))
        strat_tv.append(_tv(strat))
        print(
            f"fold {fold}: age TV random {random_tv[-1]:.3f} stratified {strat_tv[-1]:.3f}; "
            f"gender TV {_tv(rand, 'gender'):.3f} -> {_tv(strat, 'gender'):.3f}; "
            f"val row share {_val_share(rand):.3f} -> {_val_share(strat):.3f}"
        )
        assert strat_tv[-1] < 0.06
        assert _tv(strat, "gender") < 0.02
        assert 0.09 <= _val_share(strat) <= 0.11
        assert strat.shared_users(table) == {"train-val": 0, "train-test": 0, "val-test": 0}
        # same number of users as the random choice (users without a labelled row aside)
        others = {u for u, k in zip(table.users, table.folds, strict=True) if k != fold}
        n_val = round(0.1 * len(others))
        assert n_val - 1 <= len(_val_users(table, strat)) <= n_val
    print(f"mean age TV random {np.mean(random_tv):.3f} stratified {np.mean(strat_tv):.3f}")
    assert np.mean(strat_tv) < 0.2 * np.mean(random_tv)


def test_stratified_validation_depends_on_the_seed(table: Table) -> None:
    users = [_val_users(table, make_split(table, 1, SplitConfig(seed=s))) for s in range(4)]
    assert all(users[0] != other for other in users[1:])
    assert len(set().union(*users)) > 2 * len(users[0])  # not the same few "balanced" users


def _lopsided_table(n_users: int = 200, seed: int = 5) -> Table:
    """Five folds of users who each have one age group and one gender (a family album), with
    1-60 photos each: the case where a random choice of users is skewed."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        age, gender = rng.integers(0, len(AGE_GROUPS)), GENDERS[rng.integers(0, 2)]
        for j in range(int(rng.integers(1, 61))):
            label = LEVI_HASSNER_AGE_STRINGS[age] if j % 10 else "None"  # some rows unlabelled
            source = f"fold_{u % 5}_data.txt:{j + 2}"
            rows.append(Row(u % 5, f"user{u:03d}", f"{u}_{j}.jpg", j, label, gender, source, ""))
    return Table(rows=tuple(rows), duplicates={k: 0 for k in range(5)})


def test_stratified_validation_on_a_synthetic_table() -> None:
    table = _lopsided_table()
    random_tv, strat_tv = [], []
    for seed in range(3):
        for fold in range(5):
            strat = make_split(table, fold, SplitConfig(seed=seed))
            rand = make_split(table, fold, _random_val(SplitConfig(seed=seed)))
            assert strat.shared_users(table) == {"train-val": 0, "train-test": 0, "val-test": 0}
            assert len(_val_users(table, strat)) == len(_val_users(table, rand)) == 16
            assert 0.08 <= _val_share(strat) <= 0.12
            random_tv.append(_tv(rand))
            strat_tv.append(_tv(strat))
    print(
        f"synthetic: mean age TV random {np.mean(random_tv):.3f} stratified {np.mean(strat_tv):.3f}"
    )
    assert max(strat_tv) < 0.15
    assert np.mean(strat_tv) < 0.5 * np.mean(random_tv)


def test_summary_and_distribution_line() -> None:
    table = _lopsided_table()
    split = make_split(table, 0)
    summary = split.summary(table)
    assert summary["stratified"] is True
    for p in ("train", "val", "test"):
        assert list(summary[p]["age_groups"]) == list(AGE_GROUPS)
        assert list(summary[p]["genders"]) == list(GENDERS)
        assert sum(summary[p]["age_groups"].values()) == summary[p]["age"]
        assert sum(summary[p]["genders"].values()) == summary[p]["gender"]
    line = distribution_line(split, table)
    n_users = len(_val_users(table, split))
    assert line.startswith(f"val {len(split.val.rows):,} rows, {n_users} users: age 0-2 ")
    assert "| 60-100 " in line
    assert " ; gender m " in line
    assert line.endswith("%")
    assert distribution_line(split, table, "test").startswith("test ")


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
    assert d["stratified"] is True
    assert sum(d["val"]["age_groups"].values()) == d["val"]["age"]
    res = run_cli("data", "split", "--metadata", real_metadata, "--fold", "3")
    assert res.returncode == 0, res.stderr
    assert "validation users: stratified" in res.stdout
    assert "val 1," in res.stdout
    assert "; gender m " in res.stdout
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
    assert "stratified" not in d
    assert sum(d["val"]["genders"].values()) == 1430
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
