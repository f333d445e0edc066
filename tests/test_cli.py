"""The assembled `agegender` command: one parser from each layer's commands, one precedence rule
for flags and `key=value` overrides (the flag wins), the MLflow UI hint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agegender import cli
from flows.cli import build_parser, cmd_predict, pretrain_config, ui_hint


@pytest.mark.parametrize(
    "argv",
    [
        ["--task", "age", "train.task=gender"],
        ["train.task=gender", "--task", "age"],  # the order typed does not matter
    ],
)
def test_train_fold_flag_beats_a_conflicting_override(argv: list[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  task: gender\n")
    args = cli.parse(
        build_parser(),
        ["train-fold", "--cache", "c", "--fold", "0", "--config", str(config), *argv],
    )
    assert cli.train_fold_config(args).train.task == "age"
    # no flag: the override and the file are used as before
    args = cli.parse(
        build_parser(), ["train-fold", "--cache", "c", "--fold", "0", "train.task=age"]
    )
    assert cli.train_fold_config(args).train.task == "age"


def test_pretrain_flags_beat_conflicting_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"pretrain:\n  root: {tmp_path / 'from-file'}\n")
    args = cli.parse(
        build_parser(),
        [
            "pretrain",
            "--source",
            "celeba",
            "--data-root",
            "/data/celeba",
            "--config",
            str(config),
            "pretrain.root=/data/other",
            "pretrain.source=utkface",
            "pretrain.seed=3",  # overrides of other settings still apply
        ],
    )
    pretrain, _ = pretrain_config(args)
    assert (pretrain.root, pretrain.source, pretrain.seed) == (Path("/data/celeba"), "celeba", 3)


def test_a_flag_value_is_taken_literally() -> None:
    """A flag is not YAML: a folder named `2024` or `on` stays that folder."""
    for name in ("2024", "on", "a: b", "[x]"):
        args = cli.parse(build_parser(), ["pretrain", "--source", "utkface", "--data-root", name])
        assert pretrain_config(args)[0].root == Path(name)


def test_predict_is_one_command_for_files_and_model_uris() -> None:
    for model in ("runs/x/best.pt", "models:/agegender-multitask@champion"):
        args = cli.parse(build_parser(), ["predict", "a.jpg", "--model", model])
        assert args.func is cmd_predict
        assert args.run_root == Path("runs/suite")


def test_mlflow_ui_hint_puts_the_venv_only_before_a_local_command() -> None:
    venv = Path(sys.executable).parent
    local = "mlflow ui --backend-store-uri 'sqlite:///x/mlflow.db' --host 127.0.0.1 --port 5000"
    assert ui_hint(local) == f"{venv}/{local}"
    assert ui_hint("open http://127.0.0.1:5000") == "open http://127.0.0.1:5000"
