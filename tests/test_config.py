from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from agegender.config import (
    Config,
    ConfigError,
    DataConfig,
    deviations,
    load_config,
    load_pretrain_config,
    load_suite_config,
)
from agegender.presets import MODERN, PAPER


def test_defaults_are_the_papers_solver() -> None:
    c = Config()
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
        "sgd",
        1e-3,
        0.9,
        5e-4,
    )
    assert (c.data.batch_size, c.train.iterations, c.data.crop) == (50, 50_000, 227)
    assert (c.optim.step_size, c.optim.decay_every) == (10_000, None)


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  epochs: 5\n")
    c = load_config(path, ["train.epochs=20", "data.batch_size=64", "train.patience=null"])
    assert (c.optim.lr, c.train.epochs, c.data.batch_size, c.train.patience) == (0.01, 20, 64, None)
    assert c.hash() != Config().hash()
    assert (
        c.hash()
        == load_config(
            path, ["data.batch_size=64", "train.epochs=20", "train.patience=null"]
        ).hash()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0 (got -1)"),
        (["optim.name=rmsprop"], "optim.name: Input should be 'sgd', 'adam' or 'adamw'"),
        (["model.norm=group"], "model.norm: Input should be 'lrn' or 'batchnorm'"),
        (
            ["bogus=1"],
            "unknown config key 'bogus'; the top level has: preset, data, model, optim, train",
        ),
        (["train"], "is not of the form key=value"),
        (["data.split.protocol=levi_hassner"], "data.split: protocol 'levi_hassner' needs `lists`"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)


def test_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_refused_naming_the_line(tmp_path: Path) -> None:
    """YAML keeps the last of a repeated key: a second `train:` block would drop the first."""
    path = tmp_path / "c.yaml"
    at = re.escape(str(path))
    path.write_text("train:\n  epochs: 3\nsuite:\n  variants: [age]\ntrain:\n  seed: 4\n")
    twice = "line 5: duplicate key 'train' (first at line 1): the second would silently replace"
    with pytest.raises(ConfigError, match=f"^{at}, {re.escape(twice)}"):
        load_suite_config(path)
    path.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=f"^{at}, line 3: duplicate key 'epochs'"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"^preset {at}, line 3: duplicate key 'epochs'"):
        load_config(preset=str(path))
    path.write_text("train:\n  epochs: 3\n bad: [\n")  # a syntax error: one line too
    with pytest.raises(ConfigError, match=f"^{at}, line 3: not valid YAML/JSON: [^\n]*$"):
        load_config(path)


def test_suite_section() -> None:
    suite, base = load_suite_config(
        None, ["suite.variants=[multitask, age]", "suite.slots=2", "train.epochs=3"]
    )
    assert (suite.variants, suite.slots, base.train.epochs) == (("multitask", "age"), 2, 3)
    assert suite.variant_config(base, "age").train.task == "age"
    with pytest.raises(ConfigError, match=r"^suite: variant multitask_pretrained needs"):
        load_suite_config(None, [])
    with pytest.raises(ConfigError, match=r"unknown config key 'suite.slot' \(did you mean"):
        load_suite_config(None, ["suite.slot=2"])
    pre = load_suite_config(
        None, ["suite.pretrained=x/best.pt", "suite.freeze=conv", "suite.backbone_lr=0.1"]
    )[0]
    tuned = pre.variant_config(base, "multitask_pretrained", Path("x/best.pt"))
    assert tuned.model.init_from == Path("x/best.pt")
    assert (tuned.model.freeze, tuned.optim.backbone_lr) == ("conv", 0.1)
    # the fine-tuning options never touch the variants trained from scratch
    scratch = pre.variant_config(base, "multitask")
    assert (scratch.model.init_from, scratch.model.freeze, scratch.optim.backbone_lr) == (
        None,
        "none",
        1.0,
    )
    # or pretrain first: a source download instead of a checkpoint
    auto = load_suite_config(
        None,
        [
            "suite.pretrain.root=celeba",
            "suite.pretrain.overrides=[train.epochs=2, optim.lr=0.01]",
            "model.freeze=conv",
        ],
    )[0]
    assert auto.pretrain.source == "celeba"
    pre_cfg = auto.pretrain.train_config(base.model_copy(update={"model": tuned.model}))
    assert (pre_cfg.train.epochs, pre_cfg.optim.lr, pre_cfg.train.task) == (2, 0.01, "multitask")
    assert (pre_cfg.model.init_from, pre_cfg.model.freeze) == (None, "none")
    with pytest.raises(ConfigError, match=r"unknown config key 'suite.pretrain.sorce'"):
        load_suite_config(None, ["suite.pretrain.sorce=celeba"])
    with pytest.raises(ConfigError, match=r"suite.pretrain.source: Input should be 'celeba'"):
        load_suite_config(None, ["suite.pretrain.source=imagenet"])
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction must be < 1"):
        load_pretrain_config(None, ["pretrain.val_fraction=0.5", "pretrain.test_fraction=0.5"])
    bad = load_suite_config(None, ["suite.pretrained=x", "suite.pretrain.overrides=[optim.lr=-1]"])
    with pytest.raises(ConfigError, match=r"pretrain.overrides: optim.lr: Input should be greater"):
        bad[0].pretrain.train_config(bad[1])


def test_hash_counts_a_checkpoint_by_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    config_a = load_config(None, [f"model.init_from={a}"])
    config_b = load_config(None, [f"model.init_from={b}"])
    assert config_a.hash() == config_b.hash()  # same weights in another folder
    b.write_bytes(b"retrained")
    assert load_config(None, [f"model.init_from={b}"]).hash() != config_a.hash()
    assert config_a.hash() != load_config(None, []).hash()


def test_paper_preset_is_the_default_and_every_setting_is_sourced() -> None:
    assert load_config() == load_config(preset="paper") == Config()
    flat = Config().model_dump(mode="json")
    for setting in PAPER:
        node = flat
        for part in setting.key.split("."):
            node = node[part]
        assert node == setting.value, setting.key
        assert setting.basis in ("paper", "assumption", "ours")
        assert setting.source, setting.key
    c = Config()
    assert (c.data.normalize, c.model.init, c.train.patience, c.train.test_at) == (
        "mean_image",
        "caffe",
        None,
        "final",
    )
    # the released solver's multipliers: biases at 2x lr without decay, fc8 at 10x
    assert (c.optim.bias_lr_mult, c.optim.bias_decay_mult, c.optim.head_lr_mult) == (2, 0, 10)


def test_modern_preset_and_deviations_are_recorded(tmp_path: Path) -> None:
    modern = load_config(preset="modern")
    assert modern.preset == "modern"
    assert (modern.model.norm, modern.optim.name, modern.data.normalize) == (
        "batchnorm",
        "adamw",
        "channel_mean_std",
    )
    assert set(MODERN) <= {s.key for s in PAPER} | {"train.iterations"}
    assert deviations(modern) == []
    assert deviations(Config()) == []
    # a flag wins over the file's preset key; overrides go on top of both
    path = tmp_path / "c.yaml"
    path.write_text("preset: modern\ndata:\n  crop: 64\n")
    assert load_config(path).preset == "modern"
    assert load_config(path, preset="paper").model.norm == "lrn"
    c = load_config(path, ["optim.lr=0.01"])
    assert deviations(c) == ["data.crop=64", "optim.lr=0.01"]
    assert c.hash() != load_config(path, ["optim.lr=0.01"], preset="paper").hash()
    # a preset file
    preset = tmp_path / "mine.yaml"
    preset.write_text("model:\n  norm: batchnorm\n")
    mine = load_config(preset=str(preset))
    assert (mine.preset, mine.model.norm, mine.optim.name) == (str(preset), "batchnorm", "sgd")
    with pytest.raises(ConfigError, match="not one of paper, modern and not a YAML/JSON file"):
        load_config(preset="fancy")


def test_configs_from_before_step_size_load_and_hash_as_they_did() -> None:
    """A checkpoint's or a finished fold's config saved before `optim.step_size` holds
    `optim.decay_every` (a fraction; 0.2 in both presets): it loads and still means a fraction,
    and a config whose drops a fraction gives keeps its hash (hashes from 73d97f8)."""
    old = Config().model_dump(mode="json")
    del old["optim"]["step_size"]
    old["optim"]["decay_every"] = 0.2
    saved = Config.model_validate(old)
    assert (saved.optim.step_every(50_000), saved.optim.step_every(2000)) == (10_000, 400)
    small = ["data.crop=48", "train.iterations=2000", "optim.step_repeat=false"]
    small += ["train.tencrop=false"]
    assert [
        saved.hash(),
        Config().hash(),
        load_config(preset="modern").hash(),  # cosine: the step's settings are read by nothing
        load_config(None, [*small, "optim.step_size=1600"]).hash(),  # = decay_every=0.8
    ] == ["4cfff7eda38f", "4cfff7eda38f", "15049d14fab1", "32ed2193a7b0"]
    # the paper's 10k in 2,000 iterations never drops; before, the preset dropped at 400
    assert load_config(None, ["train.iterations=2000"]).hash() != "375dd142b904"


def test_the_pretraining_override_picks_the_checkpoint_carried_over() -> None:
    """The backbone carried over is the checkpoint the pretraining config tests: the final
    weights under the paper preset, the source's best validation epoch when asked."""
    given = ["suite.pretrain.root=/data/celeba"]
    suite, base = load_suite_config(None, given)
    assert suite.pretrain.train_config(base).train.test_at == "final"
    suite, base = load_suite_config(
        None, [*given, "suite.pretrain.overrides=[train.test_at=best_val]"]
    )
    picked = suite.pretrain.train_config(base).train
    assert (picked.test_at, picked.select_metric, base.train.test_at) == (
        "best_val",
        "loss",
        "final",
    )


def test_suite_seeds() -> None:
    suite, _ = load_suite_config(None, ["suite.variants=[age]", "suite.seeds=[0, 1, 2]"])
    assert suite.seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        load_suite_config(None, ["suite.variants=[age]", "suite.seeds=[1, 1]"])


def test_readme_lists_every_paper_setting_with_its_basis() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Paper settings") : text.index("### Does the paper preset train?")]
    for s in PAPER:
        value = s.value if isinstance(s.value, str) else json.dumps(s.value)
        assert f"| `{s.key}` | `{value}` | {s.basis} | {s.source} |" in section, s.key
    assert section.count("\n| `") == len(PAPER)


def test_config_from_data_applies_its_preset() -> None:
    """A flow's `config` parameter (validated by Prefect into a `Config`) names a preset as a
    config file does; complete data, as a checkpoint saves it, is unchanged."""
    assert Config.model_validate({}) == Config()
    modern = Config.model_validate({"preset": "modern", "data": {"crop": 64}})
    assert modern == load_config(None, ["data.crop=64"], preset="modern")
    assert modern != Config(data=DataConfig(crop=64))
    assert Config.model_validate(Config().model_dump(mode="json")) == Config()
    saved = modern.model_dump(mode="json") | {"preset": "/gone/preset.yaml"}
    assert Config.model_validate(saved).optim == modern.optim
    with pytest.raises(ValidationError, match="preset 'fancy'"):
        Config.model_validate({"preset": "fancy"})
