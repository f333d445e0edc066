"""Configuration as validated pydantic models, so a bad value fails early with the key's name."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agegender.labels import AgePolicy
from agegender.presets import PresetError, load_yaml, preset_data, yaml_problem

Protocol = Literal["subject_disjoint", "levi_hassner"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    """How one fold is divided into train / validation / test."""

    protocol: Protocol = "subject_disjoint"
    age_policy: AgePolicy = "strict"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of training users held out")
    stratify: bool = Field(
        True,
        description="subject_disjoint: choose validation users whose label distribution matches "
        "training's (seeded, still user-disjoint)",
    )
    seed: int = Field(0, ge=0)
    lists: Path | None = Field(None, description="Levi-Hassner list dir (levi_hassner protocol)")

    @model_validator(mode="after")
    def _lists_for_levi_hassner(self) -> SplitConfig:
        if self.protocol == "levi_hassner" and self.lists is None:
            raise ValueError("protocol 'levi_hassner' needs `lists` (the test_fold_is_K directory)")
        return self


Resize = Literal["antialias", "caffe"]


class CacheConfig(_Strict):
    """How images are decoded into the cache (all but `workers` go into the fingerprint)."""

    image_size: int = Field(256, ge=8, le=1024, description="side of the square cached image")
    draft: bool = Field(True, description="let the JPEG decoder downscale before the resize")
    resize: Resize = Field(
        "antialias",
        description="antialias: bilinear with antialiasing (ours); caffe: full JPEG decode, "
        "bilinear without antialiasing, as cv::resize in Caffe's convert_imageset (theirs)",
    )
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per CPU core")


Task = Literal["multitask", "age", "gender"]
Normalization = Literal["mean_image", "channel_mean", "channel_mean_std"]
Metric = Literal["loss", "age_acc", "age_1off", "gender_acc", "mean_acc"]
Precision = Literal["fp32", "tf32", "bf16"]
StepMode = Literal["auto", "eager", "graph", "compiled"]


class DataConfig(_Strict):
    """What the model sees: the split, the crop and the batch."""

    split: SplitConfig = SplitConfig()
    crop: int = Field(227, ge=16, le=1024, description="square crop fed to the net (cache: 256)")
    batch_size: int = Field(50, ge=1, le=4096)
    normalize: Normalization = Field(
        "mean_image",
        description="mean_image: Caffe's per-pixel mean image of the training images subtracted "
        "from 0-255 pixels; channel_mean: per-channel mean only; channel_mean_std: also / std",
    )
    norm_images: int | None = Field(
        None, ge=1, description="training images the mean (and std) are measured on; null = all"
    )
    preload: Literal["auto", "always", "never"] = Field(
        "auto", description="keep the split's images in device memory (auto: when they fit)"
    )
    shuffle_labels: bool = Field(
        False, description="control run: permute training/validation labels (test stays real)"
    )


class ModelConfig(_Strict):
    norm: Literal["lrn", "batchnorm"] = "lrn"
    init: Literal["caffe", "pytorch"] = Field(
        "caffe",
        description="caffe: the released prototxt's Gaussian fillers and constant biases; "
        "pytorch: torch's default (Kaiming-uniform) initialisation",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    init_from: Path | None = Field(
        None, description="checkpoint (best.pt) whose backbone initialises this net; heads fresh"
    )
    freeze: Literal["none", "conv"] = Field(
        "none", description="conv: keep conv1-3 (and their norms) fixed, as the seed fine-tuned"
    )


class OptimConfig(_Strict):
    """The paper's Caffe solver by default: SGD 0.9, weight decay 5e-4, lr 1e-3 x0.1 per 10k its,
    with the released prototxt's per-layer multipliers (see `agegender.presets`)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_size: int = Field(
        10_000,
        ge=1,
        description="step schedule: iterations between drops (Caffe's stepsize; the paper's "
        "10k), whatever the run's length",
    )
    decay_every: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="step schedule: if set, replaces step_size: drop after this fraction of "
        "training (moves with train.iterations or train.epochs)",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    step_repeat: bool = Field(
        True,
        description="step schedule: drop every step (Caffe's step policy); false: once",
    )
    bias_lr_mult: float = Field(2.0, ge=0.0, description="biases learn at this multiple of lr")
    bias_decay_mult: float = Field(
        0.0, ge=0.0, description="weight decay on biases as a multiple of weight_decay"
    )
    head_lr_mult: float = Field(
        10.0, ge=0.0, description="the output layers (fc8) learn at this multiple of lr"
    )
    backbone_lr: float = Field(
        1.0, ge=0.0, le=1.0, description="backbone learning rate as a fraction of lr (fine-tuning)"
    )

    def step_every(self, total: int) -> int:
        """Iterations between the step schedule's drops in a run of `total` iterations."""
        if self.decay_every is None:
            return self.step_size
        return max(1, round(self.decay_every * total))


class TrainConfig(_Strict):
    task: Task = "multitask"
    iterations: int = Field(50_000, ge=1, description="SGD steps (paper: 50k of batch 50)")
    epochs: float | None = Field(None, gt=0, description="if set, replaces iterations")
    age_weight: float = Field(1.0, ge=0.0)
    gender_weight: float = Field(1.0, ge=0.0)
    select_metric: Metric = Field(
        "loss", description="validation metric for best_val and early stopping"
    )
    test_at: Literal["final", "best_val"] = Field(
        "final",
        description="checkpoint that is tested: the last iteration (validation only monitored), "
        "or the epoch the validation metric selected",
    )
    patience: int | None = Field(None, ge=1, description="epochs without improvement; null = off")
    seed: int = Field(0, ge=0)
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto|cpu|cuda[:N]"
    )
    precision: Precision = Field(
        "fp32",
        description="float math on CUDA: fp32; tf32 (convolutions and matmuls on TF32 tensor "
        "cores); bf16 (autocast). No effect on a CPU",
    )
    step: StepMode = Field(
        "auto",
        description="how a training step runs: eager (op by op); graph (the whole step, input "
        "gather to optimiser, replayed as one CUDA graph); compiled (the same, its forward and "
        "backward fused by torch.compile); auto: compiled on CUDA (graph when deterministic), "
        "eager on a CPU",
    )
    channels_last: bool = Field(True, description="NHWC memory format on CUDA")
    tencrop: bool = Field(True, description="also test with 10-crop over-sampling")
    deterministic: bool = Field(
        False, description="deterministic algorithms (CUDA: slower; see the README)"
    )

    @model_validator(mode="after")
    def _compiled_is_not_deterministic(self) -> TrainConfig:
        if self.deterministic and self.step == "compiled":
            raise ValueError(
                "train.step=compiled cannot promise train.deterministic=true (torch.compile "
                "tunes its kernels by timing them); use train.step=graph or auto"
            )
        return self


class Config(_Strict):
    preset: str = Field("paper", description="the preset these settings started from")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _on_its_preset(cls, data: Any) -> Any:
        """Sections given as data (a flow's parameters, a JSON file) sit on their `preset`
        (default `paper`), as a config file's do; complete data (a checkpoint's) is unchanged.
        A preset file gone since a complete config was saved is no reason to refuse it, and
        `train.bf16: true|false` (saved before `train.precision`) reads as bf16 or fp32."""
        if not isinstance(data, Mapping):
            return data
        train = data.get("train")
        if isinstance(train, Mapping) and "bf16" in train:  # saved before train.precision
            train = {k: v for k, v in train.items() if k != "bf16"}
            train["precision"] = "bf16" if data["train"]["bf16"] is True else "fp32"
            data = {**data, "train": train}
        try:
            return _on_preset(data, None)
        except ConfigError:
            if all(k in data for k in ("data", "model", "optim", "train")):
                return data
            raise

    def hash(self) -> str:
        """Short content hash: equal configs train equal models (with equal data).

        The device and the step's mode are left out: they say where and how a fold ran, not
        what was trained (each gives the same numbers up to float rounding). A checkpoint in
        `model.init_from` counts by its content, not its path: the same weights downloaded to
        another folder give the same hash, retrained weights at the same path do not.
        """
        data = self.model_dump(mode="json", exclude={"train": {"device", "step"}})
        # fp32 and bf16 hash as `train.bf16` did before `train.precision` came, so that a suite
        # rerun finds the folds trained before it
        precision = data["train"].pop("precision")
        if precision == "tf32":
            data["train"]["precision"] = precision
        else:
            data["train"]["bf16"] = precision == "bf16"
        if self.model.init_from is not None:
            data["model"]["init_from"] = file_digest(self.model.init_from)
        _hash_step_as_a_fraction(data["optim"], self.optim, self.train)
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _hash_step_as_a_fraction(data: dict[str, Any], o: OptimConfig, t: TrainConfig) -> None:
    """The step schedule as it was hashed before `optim.step_size` (`decay_every`, a fraction of
    training, default 0.2), wherever a fraction gives the same drops, so that a suite rerun finds
    the folds trained before it; otherwise `step_size`, and what the schedule never reads is out."""
    step = data.pop("step_size")
    if o.decay_every is not None:  # the fraction replaces step_size
        return
    if o.schedule != "step":  # neither is read
        data["decay_every"] = 0.2
    elif t.epochs is None and step <= t.iterations:
        data["decay_every"] = step / t.iterations
    else:  # drops that no fraction of this run gives (the paper's 10k in a shorter run)
        data["step_size"] = step


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes ("missing:PATH" when absent), cached while it is unchanged."""
    try:
        st = Path(path).stat()
    except OSError:
        return f"missing:{path}"
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a bad value."""


def _check_keys(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in data.items():
        fields = model.model_fields
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; "
                f"{prefix.rstrip('.') or 'the top level'} has: "
                f"{', '.join(fields)}"
            )
        sub = fields[key].annotation
        if isinstance(value, Mapping) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(sub, value, f"{prefix}{key}.")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` strings applied to a nested dict; values are parsed as YAML scalars."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. optim.lr=0.01)"
            )
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
        try:
            node[leaf] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value ({exc})") from None
    return data


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = load_yaml(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}, {yaml_problem(exc)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        kind = type(loaded).__name__
        raise ConfigError(f"{path}: expected a mapping of sections, got a {kind}")
    return loaded or {}


def _describe(exc: ValidationError, prefix: str, path: Path | str | None) -> str:
    problems = []
    for e in exc.errors():
        loc = (prefix + ".".join(str(x) for x in e["loc"])).rstrip(".") or "config"
        # a whole-section check (empty location) would echo the whole section: leave it out
        got = f" (got {e['input']!r})" if e["loc"] else ""
        problems.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}{got}")
    return (f"{path}: " if path else "") + "; ".join(problems)


def _validate(data: dict[str, Any], path: Path | str | None) -> Config:
    _check_keys(Config, data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "", path)) from None


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _layers(
    path: Path | str | None, overrides: Sequence[str], preset: str | None
) -> dict[str, Any]:
    """A preset, then a YAML/JSON file, then `key=value` overrides (later wins).

    The preset is `preset` (a flag) if given, else the file's `preset:` key, else `paper`.
    """
    data = _read_file(Path(path)) if path is not None else {}
    return apply_overrides(_on_preset(data, preset), overrides)


def _on_preset(data: Mapping[str, Any], preset: str | None) -> dict[str, Any]:
    """`data` over its preset: `preset` if given, else data's `preset` key, else `paper`."""
    try:
        base = preset_data(str(preset or data.get("preset") or "paper"))
    except PresetError as exc:
        raise ConfigError(str(exc)) from None
    return _merge(base, data) | {"preset": base["preset"]}


def load_config(
    path: Path | str | None = None, overrides: Sequence[str] = (), preset: str | None = None
) -> Config:
    """A preset (default `paper`), a YAML/JSON file, then `key=value` overrides; validated with
    errors that name the key."""
    return _validate(_layers(path, overrides, preset), path)


def deviations(config: Config) -> list[str]:
    """`key=value` for every setting that differs from the config's own preset, except where a
    fold ran and what a suite variant sets (task, backbone): what "paper, but ..." means."""
    try:
        base = load_config(preset=config.preset)
    except ConfigError:
        return ["preset file no longer readable"]
    ours, theirs = flatten(config.model_dump(mode="json")), flatten(base.model_dump(mode="json"))
    skip = {
        "train.device",
        "train.step",
        "train.task",
        "model.init_from",
        "model.freeze",
        "optim.backbone_lr",
    }
    return [f"{k}={v}" for k, v in ours.items() if k not in skip and theirs.get(k) != v]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys (MLflow params, deviations from a preset)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


Variant = Literal["multitask", "multitask_pretrained", "age", "gender"]
VARIANTS: tuple[Variant, ...] = ("multitask", "multitask_pretrained", "age", "gender")
Source = Literal["celeba", "utkface"]


class PretrainConfig(_Strict):
    """Multi-task pretraining on a larger face set (the seed's second experiment; Levi & Hassner
    trained from scratch)."""

    source: Source = Field("celeba", description="celeba | utkface")
    root: Path | None = Field(None, description="the source's download (its official layout)")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="UTKFace only (CelebA has an official partition)"
    )
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="UTKFace only")
    seed: int = Field(0, ge=0, description="UTKFace split seed")
    overrides: tuple[str, ...] = Field(
        (), description="key=value on the base config for pretraining only, e.g. train.epochs=5"
    )

    @model_validator(mode="after")
    def _fractions(self) -> PretrainConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        return self

    def train_config(self, base: Config) -> Config:
        """The base config with the overrides, multi-task, from scratch, nothing frozen."""
        data = apply_overrides(base.model_dump(mode="json"), self.overrides)
        data = apply_overrides(
            data, ["train.task=multitask", "model.init_from=", "model.freeze=none"]
        )
        return _validate(data, "pretrain.overrides")


class SuiteConfig(_Strict):
    """The paper's experiments as variants of one base config, each over the CV folds.

    What to train, not how it is run: the orchestration's settings (where folds run, retries)
    extend it in `flows.settings`."""

    name: str = Field("agegender", min_length=1, description="MLflow experiment name")
    variants: tuple[Variant, ...] = VARIANTS
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seeds: tuple[int, ...] | None = Field(
        None,
        description="repeats: each fold trained once per seed (train.seed), averaged per fold "
        "before the statistics across folds; null = once, with train.seed",
    )
    slots: int = Field(
        0, ge=0, description="folds at once; 0 = 8 on each GPU (the measured best), 1 on a CPU"
    )
    image_size: int = Field(256, ge=8, le=1024, description="cache image side (paper: 256)")
    resize: Resize = Field(
        "antialias", description="the Adience cache's resize (cache.resize; theirs: caffe)"
    )
    pretrained: str | None = Field(
        None,
        description="backbone for multitask_pretrained: a best.pt path, runs:/RUN_ID/PATH or "
        "models:/NAME/VERSION|@ALIAS; unset = pretrain first on `pretrain`",
    )
    pretrain: PretrainConfig = PretrainConfig()
    freeze: Literal["none", "conv"] = Field(
        "none", description="multitask_pretrained: conv = keep conv1-3 fixed (as the seed)"
    )
    backbone_lr: float = Field(
        1.0, ge=0.0, le=1.0, description="multitask_pretrained: backbone lr as a fraction of lr"
    )
    published_spread: Literal["se", "sd"] = Field(
        "se",
        description="how the summary reads Levi & Hassner's '±' for its headline test (both "
        "readings are printed): se = a standard error, their std = SE x sqrt(5), the cautious "
        "reading (their side the wider) while their captions' wording is unverified; sd = a std "
        "over their 5 folds. Source: ours",
    )

    @model_validator(mode="after")
    def _pretrained_given(self) -> SuiteConfig:
        if (
            "multitask_pretrained" in self.variants
            and self.pretrained is None
            and self.pretrain.root is None
        ):
            raise ValueError(
                "variant multitask_pretrained needs a backbone: give suite.pretrain.root=DIR "
                "(a CelebA or UTKFace download, pretrained first) or suite.pretrained=PATH|"
                "runs:/...|models:/..., or drop the variant"
            )
        if not set(self.folds) <= {0, 1, 2, 3, 4}:
            raise ValueError(f"folds must be among 0-4, got {list(self.folds)}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) < len(self.seeds)):
            raise ValueError(f"seeds must be distinct and not empty, got {list(self.seeds)}")
        return self

    def variant_config(
        self, base: Config, variant: Variant, checkpoint: Path | None = None
    ) -> Config:
        """The base config for one variant; multitask_pretrained starts from `checkpoint`."""
        task: Task = "multitask" if variant.startswith("multitask") else variant  # type: ignore[assignment]
        model, optim = base.model, base.optim
        if variant == "multitask_pretrained":
            if checkpoint is None:
                raise ValueError("multitask_pretrained needs the pretrained checkpoint's path")
            model = model.model_copy(update={"init_from": checkpoint, "freeze": self.freeze})
            optim = optim.model_copy(update={"backbone_lr": self.backbone_lr})
        train = base.train.model_copy(update={"task": task})
        return base.model_copy(update={"model": model, "optim": optim, "train": train})


M = TypeVar("M", bound=BaseModel)


def load_section(
    section: str,
    model: type[M],
    path: Path | str | None,
    overrides: Sequence[str],
    preset: str | None,
) -> tuple[M, Config]:
    """A config file's (or `section.` overrides') section as `model`, beside the config."""
    data = _layers(path, overrides, preset)
    section_data = data.pop(section, {}) or {}
    _check_keys(model, section_data, f"{section}.")
    try:
        sub = model.model_validate(section_data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"{section}.", path)) from None
    return sub, _validate(data, path)


def load_suite_config(
    path: Path | str | None = None, overrides: Sequence[str] = (), preset: str | None = None
) -> tuple[SuiteConfig, Config]:
    """Like `load_config`, with a `suite` section (or `suite.` overrides) for the suite itself."""
    return load_section("suite", SuiteConfig, path, overrides, preset)


def load_pretrain_config(
    path: Path | str | None = None, overrides: Sequence[str] = (), preset: str | None = None
) -> tuple[PretrainConfig, Config]:
    """Like `load_config`, with a `pretrain` section (or `pretrain.` overrides)."""
    return load_section("pretrain", PretrainConfig, path, overrides, preset)
