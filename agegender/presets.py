"""Named starting points for a config: `paper` and `modern`.

`paper` is Levi & Hassner (2015) as published. Every setting says where it comes from: "paper"
(stated in the paper), "assumption" (not stated there; the source named is the authors' released
Caffe files, github.com/GilLevi/AgeGenderDeepLearning, `age_net_definitions/` and
`gender_net_definitions/`), or "ours" (a deliberate departure, declared in every comparison
table). The README's "Paper settings" table is checked against this list by a test.

`modern` is what a 2020s practitioner would train the same net with (batch norm, AdamW, cosine
decay, per-channel standardisation). It is not the paper's and is never labelled as such.
A preset may also be a YAML/JSON file with the same sections as a `--config` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

Basis = Literal["paper", "assumption", "ours"]
RELEASED = "released Caffe files"
PRESETS = ("paper", "modern")


@dataclass(frozen=True)
class Setting:
    key: str
    value: Any
    basis: Basis
    source: str


PAPER: tuple[Setting, ...] = (
    Setting("data.crop", 227, "paper", "227 x 227 crops of the 256 x 256 faces"),
    Setting("data.batch_size", 50, "paper", "mini-batches of 50 images"),
    Setting(
        "data.normalize",
        "mean_image",
        "assumption",
        f"{RELEASED}: mean_file in the train prototxt (made by compute_image_mean), subtracted "
        "from the 0-255 pixels, no division by a std; theirs was computed once, on the gender "
        "net's training LMDB, and used for both nets, ours on each task's training rows",
    ),
    Setting(
        "data.norm_images",
        None,
        "assumption",
        f"{RELEASED}: compute_image_mean over the whole training LMDB of the fold",
    ),
    Setting(
        "data.split.protocol",
        "subject_disjoint",
        "ours",
        "L&H used their published lists, whose validation rows share users with training; "
        "data.split.protocol=levi_hassner reproduces them",
    ),
    Setting(
        "data.split.stratify",
        True,
        "ours",
        "validation users chosen to match training's label distribution",
    ),
    Setting(
        "data.split.val_fraction",
        0.1,
        "assumption",
        "the published fold lists hold out ~10 % of the training rows",
    ),
    Setting("model.norm", "lrn", "paper", "LRN after pool1 and pool2"),
    Setting("model.dropout", 0.5, "paper", "dropout 0.5 after fc6 and fc7"),
    Setting(
        "model.init",
        "caffe",
        "assumption",
        "paper: weights N(0, 0.01); "
        f"{RELEASED}: fc6/fc7 N(0, 0.005), biases 1 on conv2/fc6/fc7, 0 elsewhere",
    ),
    Setting("optim.name", "sgd", "paper", "stochastic gradient descent"),
    Setting("optim.lr", 0.001, "paper", "initial learning rate 1e-3"),
    Setting("optim.schedule", "step", "paper", "reduced to 1e-4 after 10k iterations"),
    Setting(
        "optim.step_size",
        10_000,
        "paper",
        "a drop every 10k iterations, whatever train.iterations (Caffe's stepsize)",
    ),
    Setting(
        "optim.decay_every",
        None,
        "paper",
        "the step is a number of iterations, not a fraction of training (set, a fraction "
        "replaces optim.step_size and moves with the run's length: ours)",
    ),
    Setting("optim.gamma", 0.1, "paper", "1e-3 -> 1e-4"),
    Setting(
        "optim.step_repeat",
        True,
        "assumption",
        f"{RELEASED}: solver lr_policy step, stepsize 10000, so 1e-5 after 20k and so on "
        "(the paper names only the first drop; optim.step_repeat=false drops once)",
    ),
    Setting("optim.momentum", 0.9, "assumption", f"{RELEASED}: solver momentum 0.9"),
    Setting("optim.weight_decay", 0.0005, "assumption", f"{RELEASED}: solver weight_decay 5e-4"),
    Setting(
        "optim.bias_lr_mult", 2.0, "assumption", f"{RELEASED}: blobs_lr 1 (weights), 2 (biases)"
    ),
    Setting(
        "optim.bias_decay_mult",
        0.0,
        "assumption",
        f"{RELEASED}: weight_decay 1 (weights), 0 (biases)",
    ),
    Setting("optim.head_lr_mult", 10.0, "assumption", f"{RELEASED}: fc8 blobs_lr 10 / 20"),
    Setting("train.iterations", 50_000, "assumption", f"{RELEASED}: max_iter: 50000 in the solver"),
    Setting("train.epochs", None, "paper", "a fixed number of iterations, not epochs"),
    Setting("train.patience", None, "paper", "a fixed schedule: no early stopping"),
    Setting(
        "train.test_at",
        "final",
        "assumption",
        f"the paper does not say which snapshot was tested; the {RELEASED}' solver runs to "
        "max_iter 50000",
    ),
    Setting(
        "train.select_metric",
        "loss",
        "ours",
        "validation loss, used only with train.test_at=best_val or train.patience",
    ),
    Setting("train.tencrop", True, "paper", "centre crop and 10-crop over-sampling"),
    Setting(
        "train.age_weight",
        1.0,
        "ours",
        "L&H trained one net per task; the multi-task loss weights are ours",
    ),
    Setting("train.gender_weight", 1.0, "ours", "as train.age_weight"),
    Setting(
        "train.precision",
        "fp32",
        "assumption",
        "Caffe trained in fp32 (tf32 and bf16 are ours, for speed on a GPU)",
    ),
)

MODERN: dict[str, Any] = {
    "data.normalize": "channel_mean_std",
    "data.norm_images": 2000,
    "model.norm": "batchnorm",
    "model.init": "pytorch",
    "optim.name": "adamw",
    "optim.lr": 0.001,
    "optim.weight_decay": 0.05,
    "optim.schedule": "cosine",
    "optim.bias_lr_mult": 1.0,
    "optim.bias_decay_mult": 0.0,
    "optim.head_lr_mult": 1.0,
    "train.iterations": 8000,  # ~30 epochs of an Adience fold at batch 50
    "train.test_at": "best_val",
}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice."""


class _UniqueKeys(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: PyYAML keeps the last, so a
    second `train:` block would silently drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            if key in seen:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key '{key}' (first at line {seen[key]}): the second would "
                    "silently replace the first; merge them into one",
                    mark,
                )
            seen[key] = mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (`_UniqueKeys`)."""
    return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader: no arbitrary objects


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line, `line N: what` (PyYAML's own text spans several lines)."""
    what = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None
    what = " ".join(str(what or exc).split())
    if not isinstance(exc, DuplicateKeyError):
        what = f"not valid YAML/JSON: {what}"
    mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
    return f"line {mark.line + 1}: {what}" if mark is not None else what


class PresetError(ValueError):
    """A preset that is neither a known name nor a readable YAML/JSON file."""


def preset_data(name: str) -> dict[str, Any]:
    """The config sections a preset sets (nested, as in a config file), `preset` included."""
    if name == "paper":
        data = _nest({s.key: s.value for s in PAPER})
    elif name == "modern":
        data = _nest({s.key: s.value for s in PAPER} | MODERN)
    else:
        path = Path(name)
        if not path.suffix or not path.is_file():
            raise PresetError(
                f"preset {name!r}: not one of {', '.join(PRESETS)} and not a YAML/JSON file"
            )
        try:
            loaded = load_yaml(path.read_text())
        except OSError as exc:
            raise PresetError(f"preset {name}: cannot read it ({exc})") from None
        except yaml.YAMLError as exc:
            raise PresetError(f"preset {name}, {yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise PresetError(f"preset {name}: expected a mapping of config sections")
        data = loaded
    return data | {"preset": name}
