"""Training one split dataset (a cross-validation fold, or a pretraining source), with model
selection on validation only.

The seed picked its best epoch on the test fold. Here the test part is evaluated exactly once, at
the checkpoint that the validation metric selected, with the centre crop and with 10-crop
over-sampling. Every epoch writes a checkpoint; `resume=True` continues a killed run from it and
ends with the same metrics as an uninterrupted run (all randomness lives in saved generators).
What is trained on is a `TrainSet`: `adience_fold` here, `agegender.pretrain.source_set` for
CelebA / UTKFace; the loop is the same.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agegender import graph_step
from agegender.cache import Cache, ImageCache, open_cache
from agegender.config import Config
from agegender.data import FoldData, fold_data
from agegender.evaluate import part_metrics, predict
from agegender.graph_step import GraphStep
from agegender.labels import AGE_GROUPS, GENDERS
from agegender.metrics import mean_accuracy
from agegender.models import (
    HEADS,
    LeviHassner,
    SeededDropout,
    autocast,
    build_model,
    labelled_losses,
    to_input,
)
from agegender.runtime import determinism, float_precision, own_stream
from agegender.splits import distribution_line, make_split
from agegender.steps import Drawn, Step, drawn, planned

CHECKPOINT = "last.pt"
BEST = "best.pt"
RESULT = "result.json"
HISTORY = "history.json"

EpochLog = Callable[[dict[str, Any]], None]
Progress = Callable[[int, int], None]


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists, or belongs to another config)."""


class DeviceError(RunError):
    """A device asked for that this machine does not have (retrying cannot help)."""


def select_device(name: str) -> torch.device:
    """`auto` alone may fall back to the CPU; a CUDA device asked for and not found is an
    error, never a silent run on the CPU."""
    if name.startswith("cuda"):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= found:
            what = f"only {found} CUDA device(s)" if found else "no CUDA device"
            raise DeviceError(
                f"train.device={name}, but this machine ({platform.node()}) has {what} "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                "train.device=auto runs on the CPU when there is no GPU"
            )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fold_seeds(seed: int, fold: int) -> tuple[int, int, int]:
    """Independent seeds for initialisation, data order/augmentation and dropout."""
    a, b, c = np.random.SeedSequence([seed, fold]).generate_state(3).tolist()
    return int(a), int(b), int(c)


def total_iterations(config: Config, n_train: int) -> int:
    if config.train.epochs is None:
        return config.train.iterations
    return max(1, math.ceil(config.train.epochs * n_train / config.data.batch_size))


def lr_factor(config: Config, total: int) -> Callable[[int], float]:
    o = config.optim
    if o.schedule == "step":
        every = o.step_every(total)
        if not o.step_repeat:
            return lambda it: o.gamma if it >= every else 1.0
        return lambda it: float(o.gamma ** (it // every))
    if o.schedule == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    return lambda it: 1.0


def make_optimizer(
    model: LeviHassner, config: Config, fused: bool = False
) -> torch.optim.Optimizer:
    """Caffe's per-layer multipliers as parameter groups: heads at `lr * head_lr_mult`, the
    backbone at `lr * backbone_lr`, biases (and norm scales) at `bias_lr_mult` times their
    layer's rate with `bias_decay_mult` times the weight decay. Frozen layers are left out.
    `fused`: one kernel updates every parameter (always on a GPU; a graph step needs it on a
    CPU too, to take its learning rate as a tensor)."""
    o = config.optim
    own = dict(model.named_parameters())
    heads = {f"heads.{n}" for n, _ in model.heads.named_parameters()}
    groups: list[dict[str, Any]] = []
    for in_heads, rate in ((True, o.lr * o.head_lr_mult), (False, o.lr * o.backbone_lr)):
        part = [n for n, p in own.items() if (n in heads) == in_heads and p.requires_grad]
        weights = [own[n] for n in part if own[n].ndim > 1]
        biases = [own[n] for n in part if own[n].ndim <= 1]
        if weights:
            groups.append({"params": weights, "lr": rate, "weight_decay": o.weight_decay})
        if biases:
            groups.append(
                {
                    "params": biases,
                    "lr": rate * o.bias_lr_mult,
                    "weight_decay": o.weight_decay * o.bias_decay_mult,
                }
            )
    # the same rule as the CPU's loop; on a CPU the eager loop keeps torch's default
    use_fused = True if fused or next(iter(own.values())).is_cuda else None
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=use_fused
        )
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, fused=use_fused)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=use_fused)


@dataclass
class Run:
    """Everything that changes while a fold trains; the checkpoint is exactly this."""

    config: Config
    trainset: TrainSet
    device: torch.device
    data: FoldData
    model: LeviHassner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    gen_data: torch.Generator
    gen_dropout: torch.Generator
    total: int
    epoch: int = 0
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    bad_epochs: int = 0
    mode: str = "eager"  # how steps run (`agegender.graph_step.resolve`)
    engine: GraphStep | None = None  # the graph step, once the first epoch starts
    step_note: str | None = None  # what did not go as planned with it (result.json's `step`)

    @property
    def channels_last(self) -> bool:
        return self.config.train.channels_last and self.device.type == "cuda"

    @cached_property
    def dropouts(self) -> list[SeededDropout]:
        """Found once, not at every step (the model's layers do not change)."""
        return self.model.dropouts()

    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "config_hash": self.config.hash(),
            "data_fingerprint": self.trainset.cache.fingerprint,
            "trained_on": self.trainset.name,
            "model": self.model.state_dict(),
            "optimizer": _plain_rates(
                self.optimizer.state_dict(), [float(r) for r in self.scheduler.get_last_lr()]
            ),
            "scheduler": self.scheduler.state_dict(),
            "gen_data": self.gen_data.get_state(),
            "gen_dropout": self.gen_dropout.get_state(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen_data.set_state(state["gen_data"])
        self.gen_dropout.set_state(state["gen_dropout"])
        for key in ("epoch", "iteration", "history", "best_epoch", "best_score", "bad_epochs"):
            setattr(self, key, state[key])


@dataclass(frozen=True)
class TrainSet:
    """A split dataset to train on, from any source; everything else about a run is config."""

    name: str  # "fold 0", "celeba": a checkpoint resumes only the run it belongs to
    seed_index: int  # seeds derive from (train.seed, seed_index): the fold for Adience
    cache: ImageCache
    classes: dict[str, tuple[str, ...]]  # head -> class names
    load: Callable[[torch.device, torch.Generator], FoldData]  # the parts, on the device
    ids: Callable[[int], list[Any]]  # a cache row's id columns in test_predictions.csv
    id_fields: tuple[str, ...]
    info: dict[str, Any]  # what result.json says about the data
    notes: tuple[str, ...] = ()  # caveats, shown after training
    about: tuple[str, ...] = ()  # what the data look like, shown before training


def adience_fold(cache: Cache, fold: int, config: Config) -> TrainSet:
    """Fold `fold` of an Adience cache, split by `config.data.split`."""
    split = make_split(cache.table, fold, config.data.split)

    def load(device: torch.device, gen: torch.Generator) -> FoldData:
        return fold_data(cache, split, config.train.task, config.data, device, gen)

    def ids(row: int) -> list[Any]:
        r = cache.table.rows[row]
        return [r.path, r.fold, r.user_id]

    return TrainSet(
        name=f"fold {fold}",
        seed_index=fold,
        cache=cache,
        classes={"age": AGE_GROUPS, "gender": GENDERS},
        load=load,
        ids=ids,
        id_fields=("path", "fold", "user_id"),
        info={"fold": fold, "protocol": config.data.split.protocol},
        notes=split.notes,
        about=(f"fold {fold} {distribution_line(split, cache.table, 'val')}",),
    )


def prepare_run(cache: Cache, fold: int, config: Config) -> Run:
    """An Adience fold's run, ready to train (see `start_run`)."""
    return start_run(adience_fold(cache, fold, config), config)


def start_run(ts: TrainSet, config: Config) -> Run:
    """Data on the device, a freshly initialised model and its optimiser."""
    device = select_device(config.train.device)
    init_seed, data_seed, dropout_seed = fold_seeds(config.train.seed, ts.seed_index)
    gen_data = torch.Generator().manual_seed(data_seed)
    if config.data.crop > ts.cache.image_size:
        raise RunError(
            f"data.crop={config.data.crop} is larger than the cached images "
            f"({ts.cache.image_size} px); rebuild the cache or lower the crop"
        )
    data = ts.load(device, gen_data)
    task = config.train.task
    classes = {h: len(ts.classes[h]) for h in HEADS[task]}
    model = build_model(task, config.data.crop, config.model, seed=init_seed, classes=classes)
    if config.model.init_from is not None:
        load_backbone(model, config.model.init_from)
    model.to(device)
    if config.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if config.model.freeze == "conv":
        model.freeze_features()
    gen_dropout = torch.Generator().manual_seed(dropout_seed)
    model.set_generator(gen_dropout)
    t = config.train
    try:
        mode = graph_step.resolve(t.step, t.deterministic, device, data.store.preloaded)
    except graph_step.StepError as exc:
        raise RunError(str(exc)) from None
    optimizer = make_optimizer(model, config, fused=mode != "eager")
    total = total_iterations(config, len(data.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))
    run = Run(config, ts, device, data, model, optimizer, scheduler, gen_data, gen_dropout, total)
    run.mode = mode
    return run


def load_backbone(model: LeviHassner, checkpoint: Path) -> None:
    """Copy conv1-3 and fc6/fc7 from another run's `best.pt`; the heads keep their fresh init."""
    try:
        state = load_checkpoint(checkpoint)["model"]
    except RunError as exc:
        raise RunError(f"model.init_from={exc}") from None
    except (KeyError, TypeError):
        raise RunError(
            f"model.init_from={checkpoint}: not an agegender checkpoint (no 'model' weights)"
        ) from None
    backbone = {k: v for k, v in state.items() if not k.startswith("heads.")}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    wrong = sorted(set(ours) ^ set(backbone))
    wrong += [k for k in ours if k in backbone and backbone[k].shape != ours[k].shape]
    if wrong:
        raise RunError(
            f"model.init_from={checkpoint}: its backbone does not fit this net "
            f"(different crop or norm?): {wrong[:3]}"
        )
    model.load_state_dict(backbone, strict=False)


def fit_batch(run: Run, x: torch.Tensor, step: Step) -> dict[str, Any]:
    """One SGD step on a ready input batch (the part a model-only benchmark also times). Nothing
    here reads a value back from the device: the statistics stay there until the epoch ends."""
    t = run.config.train
    with autocast(run.device, t.precision == "bf16"):
        out = run.model(x, step.masks)
    losses = labelled_losses(out, step.labelled)
    weights = {"age": t.age_weight, "gender": t.gender_weight}
    loss = sum((weights[h] * v for h, v in losses.items()), torch.zeros((), device=run.device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    run.optimizer.step()
    run.scheduler.step()
    run.iteration += 1
    stats: dict[str, Any] = {"loss": loss.detach(), "n": x.shape[0]}
    for head, logits in out.items():
        y = step.targets[head]
        stats[f"{head}_correct"] = ((logits.argmax(1) == y) & (y >= 0)).sum().detach()
        stats[f"{head}_n"] = step.labelled[head][2]
    return stats


def epoch_steps(run: Run, steps: int) -> Iterator[Step]:
    """The next `steps` batches of a fresh shuffle of the training part (`agegender.steps`)."""
    heads, store = list(run.model.heads), run.data.store
    chunks = epoch_chunks(run, steps)
    return planned(chunks, heads, len(run.dropouts), run.device, store.preloaded)


def epoch_chunks(run: Run, steps: int) -> Iterator[Drawn]:
    """`epoch_steps`' draws, a chunk at a time on the CPU (the graph step takes them so)."""
    part, bs, crop = run.data.train, run.config.data.batch_size, run.config.data.crop
    order = torch.randperm(len(part), generator=run.gen_data)
    side = run.data.store.side
    return drawn(part, order, steps, bs, side, crop, run.gen_data, run.dropouts)


def step_input(run: Run, step: Step, channels_last: bool | None = None) -> torch.Tensor:
    """A step's batch as the net's input: its images gathered, cropped and normalised."""
    images = run.data.store.batch(step.positions)
    crops = run.data.normalize.crops(images, run.config.data.crop, step.window)
    return to_input(crops, run.channels_last if channels_last is None else channels_last)


def train_epoch(run: Run, progress: Progress | None = None) -> dict[str, float]:
    """One pass over the shuffled training part (or what is left of the iteration budget)."""
    run.model.train()
    bs = run.config.data.batch_size
    steps = min(math.ceil(len(run.data.train) / bs), run.total - run.iteration)
    start = time.perf_counter()
    if run.mode == "eager":
        out = _eager_epoch(run, steps, progress)
    else:
        if run.engine is None:
            run.engine = GraphStep(run, compiled=run.mode == "compiled")
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, steps)

        for chunk in epoch_chunks(run, steps):
            run.engine.train(chunk, tick)
        out = run.engine.epoch_sums()  # the epoch's one wait for the device
    seconds = time.perf_counter() - start
    n = int(out.get("n", 0))
    result = {"train_loss": out["loss"] / max(n, 1), "images_per_s": n / max(seconds, 1e-9)}
    for head in run.model.heads:
        result[f"train_{head}_acc"] = out[f"{head}_correct"] / max(int(out[f"{head}_n"]), 1)
    return result


def _eager_epoch(run: Run, steps: int, progress: Progress | None) -> dict[str, float]:
    sums: dict[str, Any] = {}
    for i, step in enumerate(epoch_steps(run, steps)):
        stats = fit_batch(run, step_input(run, step), step)
        stats["loss"] = stats["loss"] * stats["n"]
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v
        if progress:
            progress(i + 1, steps)
    return {k: float(v) for k, v in sums.items()}  # the epoch's one wait for the device


def epoch_line(r: dict[str, Any]) -> str:
    """One line per epoch for logs and the terminal: the numbers that show how it goes."""

    def f(key: str) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.3f}"

    parts = [f"epoch {r['epoch']:>3}", f"lr {r['lr']:.2e}", f"train loss {f('train_loss')}"]
    parts.append(f"val loss {f('val_loss')}")
    for key, name in (
        ("val_age_acc", "age"),
        ("val_age_1off", "1-off"),
        ("val_gender_acc", "gender"),
    ):
        if key in r:
            parts.append(f"{name} {f(key)}")
    parts.append(f"{r['images_per_s']:,.0f} img/s")
    return " | ".join(parts) + ("  *" if r["best"] else "")


def selection_score(metric: str, val: dict[str, Any]) -> float:
    """Higher is better."""
    if metric == "loss":
        return -float(val["loss"])
    if metric == "mean_acc":
        return mean_accuracy(val)
    value = val.get(metric)
    if value is None:
        raise RunError(f"train.select_metric={metric} is not measured for this task")
    return float(value)


def selected_value(metric: str, score: float) -> float:
    """The metric as measured, from its `selection_score` (which negates a loss so that higher
    is always better): what a description shows."""
    return -score if metric == "loss" else score


def _plain_rates(state: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    """An optimiser's state with its learning rates as numbers, the ones the next step takes
    (`rates`, the scheduler's), as the eager loop leaves them: a graph step's groups read theirs
    from a tensor that still holds the last step's, and the run may resume eagerly."""
    for group, rate in zip(state["param_groups"], rates, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(rate)
    return state


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# What checkpoints saved before the statistics became tensors hold besides tensors and plain
# data: float32 numpy arrays (rebuilt by the function their pickles name, whatever numpy's
# module for it is called). Nothing else is allowed, so no object array either.
_F32 = np.zeros(1, np.float32)
_OLD_NUMPY: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    _F32.__reduce__()[0],  # type: ignore[list-item]
    np.ndarray,
    np.dtype,
    type(_F32.dtype),
]


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """A checkpoint unpickled with `weights_only=True`: a registered model or a downloaded
    backbone may come from anywhere, and a pickle that names a function (os.system, ...) would
    run it on load. Ours hold tensors, numbers, strings and containers only."""
    try:
        with torch.serialization.safe_globals(_OLD_NUMPY):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        named = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
        if named is None:  # torch's advice around the reason is not for our users
            reason = text.partition("WeightsUnpickler error:")[2].partition("Check the doc")[0]
            raise RunError(
                f"{path}: not a readable agegender checkpoint ({reason.strip() or text})"
            ) from None
        raise RunError(
            f"{path}: refused to load: besides tensors and plain data it pickles "
            f"{named.group(1) or named.group(2)}, which could run code when unpickled; "
            "agegender never writes that (a tampered or foreign file?)"
        ) from None
    except EOFError:
        raise RunError(
            f"{path}: not a readable agegender checkpoint (empty or cut short)"
        ) from None
    except (OSError, RuntimeError) as exc:
        raise RunError(f"{path}: not a readable agegender checkpoint ({exc})") from None


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def validate(run: Run) -> dict[str, Any]:
    d, t = run.data, run.config.train
    pred = predict(
        run.model,
        d.store,
        d.val,
        run.config.data.crop,
        d.normalize,
        run.config.data.batch_size * 2,
        bf16=t.precision == "bf16",
        channels_last=run.channels_last,
    )
    weights = {"age": t.age_weight, "gender": t.gender_weight}
    metrics = part_metrics(pred.center, d.val)
    metrics["loss"] = sum(weights[h] * v for h, v in pred.losses.items())
    return metrics


@dataclass(frozen=True)
class FoldResult:
    out_dir: Path
    summary: dict[str, Any]

    @property
    def test(self) -> dict[str, Any]:
        return dict(self.summary["test"])


def train_fold(
    cache: Cache | Path | str,
    fold: int,
    config: Config,
    out_dir: Path | str,
    resume: bool = False,
    log: EpochLog | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Train fold `fold` of an Adience cache, select on validation, test once (see `train`)."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    return train(adience_fold(cache, fold, config), config, out_dir, resume, log, progress)


def train(
    ts: TrainSet,
    config: Config,
    out_dir: Path | str,
    resume: bool = False,
    log: EpochLog | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Train, monitor validation, test once; files in `out_dir` (see README)."""
    device = select_device(config.train.device)
    t = config.train
    with (
        determinism(t.deterministic),
        float_precision(t.precision, device),
        own_stream(device),
    ):
        return _train(ts, config, Path(out_dir), resume, log, progress)


def _save_tested(run: Run, out: Path) -> None:
    """best.pt: the weights that are tested (and registered, and served), with what a user
    needs to feed them."""
    ts, config = run.trainset, run.config
    _save(
        {
            "model": run.model.state_dict(),
            "epoch": run.epoch,
            "iteration": run.iteration,
            "task": config.train.task,
            "crop": config.data.crop,
            "image_size": ts.cache.image_size,  # what prediction resizes a photo to
            "config": config.model_dump(mode="json"),
            "normalize": run.data.normalize.state(),
            "labels": {h: list(ts.classes[h]) for h in run.model.heads},
            "trained_on": ts.name,
            "data_fingerprint": ts.cache.fingerprint,
        },
        out / BEST,
    )


def _train(
    ts: TrainSet,
    config: Config,
    out: Path,
    resume: bool,
    log: EpochLog | None,
    progress: Progress | None,
) -> FoldResult:
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not resume:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it, or use another --out"
        )
    started = time.perf_counter()
    run = start_run(ts, config)
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, run.device)
        for key, ours in (
            ("config_hash", config.hash()),
            ("data_fingerprint", ts.cache.fingerprint),
            ("trained_on", ts.name),
        ):
            if state.get(key) != ours:
                raise RunError(
                    f"{ckpt} has {key} {state.get(key)}, this run {ours}: it is another "
                    "run's checkpoint; use another --out"
                )
        run.load_state(state)
        if (out / RESULT).exists():
            return FoldResult(out, json.loads((out / RESULT).read_text()))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        {"config": config.model_dump(mode="json"), "config_hash": config.hash()},
        out / "config.json",
    )

    t = config.train
    try:
        while run.iteration < run.total and not (t.patience and run.bad_epochs >= t.patience):
            run.epoch += 1
            # the base rate (the paper's lr); heads and biases run at their multiples of it
            factor = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
            record: dict[str, Any] = {"epoch": run.epoch, "lr": config.optim.lr * factor}
            record |= train_epoch(run, progress)
            val = validate(run)
            record |= {f"val_{k}": v for k, v in val.items() if not isinstance(v, list)}
            record["iteration"] = run.iteration
            score = selection_score(t.select_metric, val)
            record["best"] = score > run.best_score
            if record["best"]:
                run.best_score, run.best_epoch, run.bad_epochs = score, run.epoch, 0
                if t.test_at == "best_val":
                    _save_tested(run, out)
            else:
                run.bad_epochs += 1
            run.history.append(record)
            _save(run.state(), ckpt)
            _write_json(run.history, out / HISTORY)
            if log:
                log(record)
    finally:  # the graph and what it holds go now, not whenever the collector finds the cycle
        if run.engine is not None:
            run.step_note = run.engine.note
            run.engine.close()
            run.engine = None

    if t.test_at == "final":  # the model holds them already
        _save_tested(run, out)
        tested_epoch = run.epoch
    else:
        tested = load_checkpoint(out / BEST, run.device)
        run.model.load_state_dict(tested["model"])
        tested_epoch = tested["epoch"]
    d = run.data
    pred = predict(
        run.model,
        d.store,
        d.test,
        config.data.crop,
        d.normalize,
        config.data.batch_size * 2,
        tencrop=t.tencrop,
        bf16=t.precision == "bf16",
        channels_last=run.channels_last,
    )
    # faces of one user are not independent: intervals resample the test users, seeded per fold
    users = (
        [ts.ids(int(r))[ts.id_fields.index("user_id")] for r in d.test.rows]
        if "user_id" in ts.id_fields
        else None
    )
    test = part_metrics(pred.center, d.test, users=users, seed=ts.seed_index)
    if pred.tencrop is not None:
        test |= part_metrics(pred.tencrop, d.test, "_10crop", users, ts.seed_index)
    _write_predictions(out / "test_predictions.csv", ts, d, pred.center, pred.tencrop)
    tested_val = next(h for h in run.history if h["epoch"] == tested_epoch)
    summary = {
        **ts.info,
        "trained_on": ts.name,
        "task": t.task,
        "classes": {h: list(ts.classes[h]) for h in run.model.heads},
        "config_hash": config.hash(),
        "preset": config.preset,
        "data_fingerprint": ts.cache.fingerprint,
        "synthetic": ts.cache.synthetic,
        "device": str(run.device),
        "precision": t.precision,
        "step": graph_step.describe(run.mode, run.device)
        + (f" ({run.step_note})" if run.step_note else ""),
        "sizes": {p: len(d.part(p)) for p in ("train", "val", "test")},
        "iterations": run.iteration,
        "epochs": run.epoch,
        "test_at": t.test_at,
        "tested_epoch": tested_epoch,
        "best_epoch": run.best_epoch,  # by validation, whichever checkpoint was tested
        "selected_by": (
            f"val {t.select_metric}"
            if t.test_at == "best_val"
            else "final checkpoint (validation monitored only)"
        ),
        # the tested checkpoint's validation score, higher is better, comparable across folds
        "selection_score": selection_score(t.select_metric, _val(tested_val)),
        "stopped_early": run.iteration < run.total,
        "val": _val(tested_val),
        "test": test,
        "normalize": d.normalize.describe(),
        "notes": list(ts.notes),
        "seconds": time.perf_counter() - started,
    }
    _write_json(summary, out / RESULT)
    return FoldResult(out, summary)


def _val(record: dict[str, Any]) -> dict[str, Any]:
    return {k[4:]: v for k, v in record.items() if k.startswith("val_")}


def _write_predictions(
    path: Path, ts: TrainSet, d: FoldData, center: dict[str, Any], tencrop: dict[str, Any] | None
) -> None:
    """Per-image test outputs: the raw material for error analysis and later aggregation."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        heads = list(center)
        w.writerow(
            [
                *ts.id_fields,
                *[c for h in heads for c in (f"{h}_true", f"{h}_pred", f"{h}_pred_10crop")],
                *[f"{h}_prob_{i}" for h in heads for i in range(center[h].shape[1])],
            ]
        )
        truth = {"age": d.test.age.numpy(), "gender": d.test.gender.numpy()}
        for i, row in enumerate(d.test.rows):
            cells: list[Any] = ts.ids(int(row))
            for h in heads:
                ten = int(tencrop[h][i].argmax()) if tencrop is not None else ""
                cells += [int(truth[h][i]), int(center[h][i].argmax()), ten]
            cells += [f"{p:.4f}" for h in heads for p in center[h][i]]
            w.writerow(cells)
