"""Pretraining sources through the decode-once cache, the pretraining run, and the transfer."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from agegender.cache import (
    DATASET_NAMES,
    CacheError,
    build_cache,
    build_source_cache,
    decode_image,
    open_cache,
    open_source_cache,
)
from agegender.config import CacheConfig, PretrainConfig, load_config
from agegender.pretrain import pretrain, source_parts
from agegender.sources import CELEBA_AGE_CLASSES, CELEBA_IMAGE_DIR, read_source
from agegender.synth.adience import SynthResult
from agegender.train import RunError, prepare_run, train_epoch
from tasks.pretrain import resolve_pretrained_task
from tests.conftest import TINY_TRAIN, run_cli
from tracking import TrackingError

SMALL = CacheConfig(image_size=32, workers=2)


@pytest.fixture
def roots(synth_celeba: Path, synth_utkface: Path) -> dict[str, Path]:
    return {"celeba": synth_celeba, "utkface": synth_utkface}


@pytest.mark.parametrize("fmt", ["celeba", "utkface"])
def test_source_cache_holds_the_readers_labels(
    fmt: str, roots: dict[str, Path], tmp_path: Path
) -> None:
    root = roots[fmt]
    src = read_source(fmt, root)
    first = build_source_cache(fmt, root, tmp_path / "cache", SMALL)
    assert (first.images, first.decoded, first.problems) == (len(src), len(src), ())
    cache = open_source_cache(tmp_path / "cache")
    assert (cache.dataset, cache.records, cache.age_classes) == (fmt, src.records, src.age_classes)
    assert cache.images.shape == (len(src), 32, 32, 3)
    for i in (0, len(src) // 2, len(src) - 1):
        path = src.image_dir / src.records[i].path
        np.testing.assert_array_equal(cache.image(i), decode_image(path, 32))
        # non-square images (CelebA's 178 x 218 layout) give their centre square, not a squash
        with Image.open(path) as im:
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            naive = np.asarray(
                im.convert("RGB").crop(box).resize((32, 32), Image.Resampling.BILINEAR)
            )
        assert (w != h) == (fmt == "celeba")
        assert np.abs(cache.image(i).astype(int) - naive).mean() < 4
    again = build_source_cache(fmt, root, tmp_path / "cache", SMALL)
    assert (again.decoded, again.rebuilt, again.fingerprint) == (0, False, first.fingerprint)
    with pytest.raises(
        CacheError, match=f"a cache of {DATASET_NAMES[fmt]}, but one of Adience is needed"
    ):
        open_cache(tmp_path / "cache")


def test_an_adience_cache_is_not_a_source(small_synth: SynthResult, tmp_path: Path) -> None:
    build_cache(small_synth.out, tmp_path / "cache", config=SMALL)
    with pytest.raises(
        CacheError, match="a cache of Adience, but one of CelebA or UTKFace is needed"
    ):
        open_source_cache(tmp_path / "cache")
    with pytest.raises(CacheError, match="`agegender pretrain` builds it"):
        open_source_cache(tmp_path / "nothing")


def test_bad_source_rows_and_images_are_reported(synth_celeba: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(synth_celeba, tmp_path / "celeba"))
    images = sorted((root / CELEBA_IMAGE_DIR).iterdir())
    images[0].write_bytes(b"not a JPEG" * 50)  # corrupt
    images[1].unlink()  # listed but absent
    part = root / "list_eval_partition.txt"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # image 3 has no partition
    res = build_source_cache("celeba", root, tmp_path / "cache", SMALL)
    with (tmp_path / "cache" / "report.tsv").open() as f:
        report = list(csv.DictReader(f, delimiter="\t"))
    assert len(report) == len(res.problems) == 3
    text = "\n".join(" ".join(r.values()) for r in report)
    assert f"{images[0].name} list_attr_celeba.txt:3 cannot decode" in text
    assert f"{CELEBA_IMAGE_DIR}/{images[1].name} not found; skipped" in text
    assert f"{images[2].name} has no row in list_eval_partition.txt; skipped" in text
    cache = open_source_cache(tmp_path / "cache")
    assert len(cache) == 160 - 3
    assert {r.path for r in cache.records}.isdisjoint(p.name for p in images[:3])


def test_prepare_cli_takes_a_source(synth_utkface: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(synth_utkface, tmp_path / "utkface"))
    (root / "UTKFace" / "25_2_0_20170101.jpg.chip.jpg").write_bytes(b"x")  # gender 2
    args: list[str | Path] = [
        "prepare",
        "--format",
        "utkface",
        "--data-root",
        root,
        "--cache",
        tmp_path / "cache",
    ]
    res = run_cli(*args, "--image-size", "24")
    assert res.returncode == 0, res.stderr
    assert "160 images" in res.stdout
    assert "utkface  25_2_0_20170101.jpg.chip.jpg: gender must be 0 (male) or 1 (female)" in (
        res.stdout
    )
    bad = run_cli(*args, "--metadata", root)
    assert bad.returncode == 2
    assert "--metadata is for Adience" in bad.stderr


def test_parts_official_or_seeded(roots: dict[str, Path], tmp_path: Path) -> None:
    caches = {}
    for fmt, root in roots.items():
        build_source_cache(fmt, root, tmp_path / fmt, SMALL)
        caches[fmt] = open_source_cache(tmp_path / fmt)
    celeba = source_parts(caches["celeba"], PretrainConfig())
    for i, part in enumerate(("train", "val", "test")):
        expected = [k for k, r in enumerate(caches["celeba"].records) if r.partition == i]
        assert celeba[part].tolist() == expected
    utk = source_parts(caches["utkface"], PretrainConfig(val_fraction=0.2, test_fraction=0.1))
    assert (len(utk["train"]), len(utk["val"]), len(utk["test"])) == (112, 32, 16)
    assert sorted(np.concatenate(list(utk.values())).tolist()) == list(range(160))
    same = source_parts(caches["utkface"], PretrainConfig(val_fraction=0.2, test_fraction=0.1))
    other = source_parts(
        caches["utkface"], PretrainConfig(val_fraction=0.2, test_fraction=0.1, seed=1)
    )
    assert all(np.array_equal(utk[p], same[p]) for p in utk)
    assert not np.array_equal(utk["test"], other["test"])


def test_pretraining_has_the_sources_heads_and_transfers(
    synth_celeba: Path, learn_cache: Path, tmp_path: Path
) -> None:
    build_source_cache("celeba", synth_celeba, tmp_path / "cache", CacheConfig(image_size=56))
    config = load_config(None, TINY_TRAIN)
    res = pretrain(tmp_path / "cache", config, PretrainConfig(), tmp_path / "run")
    s = res.summary
    assert s["classes"] == {"age": list(CELEBA_AGE_CLASSES), "gender": ["m", "f"]}
    assert (s["source"], s["split"], s["trained_on"]) == ("celeba", "official partition", "celeba")
    assert s["sizes"] == {"train": 128, "val": 16, "test": 16}
    assert "age_1off" not in s["test"]  # meaningless for a binary age head
    assert len(s["test"]["age_confusion"]) == 2
    best = torch.load(res.out_dir / "best.pt", weights_only=True)
    assert best["labels"]["age"] == list(CELEBA_AGE_CLASSES)
    assert best["model"]["heads.age.weight"].shape == (2, 512)
    # resuming a finished run returns its result, nothing is trained again
    again = pretrain(tmp_path / "cache", config, PretrainConfig(), tmp_path / "run", resume=True)
    assert (again.summary["test"], again.summary["seconds"]) == (s["test"], s["seconds"])

    # Transfer: the Adience net's backbone is the checkpoint's, its 8-group age head is fresh.
    tune = load_config(
        None, [*TINY_TRAIN, f"model.init_from={res.out_dir / 'best.pt'}", "model.freeze=conv"]
    )
    run = prepare_run(open_cache(learn_cache), 2, tune)
    assert run.model.heads["age"].weight.shape == (8, 512)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    for name, value in before.items():
        if not name.startswith("heads."):
            assert torch.equal(value, best["model"][name]), name
    train_epoch(run)
    after = run.model.state_dict()
    for name, value in after.items():
        if name.startswith("features."):
            assert torch.equal(value, before[name]), name  # conv1-3 frozen while fine-tuning
    assert not torch.equal(after["fc.1.weight"], before["fc.1.weight"])


def test_a_checkpoint_belongs_to_its_source(
    synth_celeba: Path, synth_utkface: Path, tmp_path: Path
) -> None:
    config = load_config(None, [*TINY_TRAIN, "train.iterations=2"])
    for fmt, root in (("celeba", synth_celeba), ("utkface", synth_utkface)):
        build_source_cache(fmt, root, tmp_path / fmt, CacheConfig(image_size=56))
    pretrain(tmp_path / "celeba", config, PretrainConfig(), tmp_path / "run")
    with pytest.raises(RunError, match="another run's checkpoint"):
        pretrain(
            tmp_path / "utkface",
            config,
            PretrainConfig(source="utkface"),
            tmp_path / "run",
            resume=True,
        )


def test_a_given_backbone_that_cannot_be_found_is_a_clear_error(tmp_path: Path) -> None:
    resolve = resolve_pretrained_task.fn
    with pytest.raises(FileNotFoundError, match=r"suite.pretrained=nowhere/best.pt: no such file"):
        resolve("nowhere/best.pt", str(tmp_path), "agegender")
    with pytest.raises(TrackingError, match=r"MLflow at sqlite:///.*Run .*not found"):
        resolve("runs:/0123456789abcdef/checkpoint", str(tmp_path), "agegender")
    with pytest.raises(TrackingError, match=r"MLflow at sqlite:///.*agegender-nope"):
        resolve("models:/agegender-nope/1", str(tmp_path), "agegender")


def test_the_suite_retries_pretraining_like_a_fold_but_not_bad_input(
    small_synth: SynthResult, tmp_path: Path
) -> None:
    """suite.retries applies to pretraining as to folds, with the folds' condition: a crash is
    retried (a retry resumes from its checkpoint), bad input is not (it stays bad). Read back
    from Prefect's API."""
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.suite import suite_flow
    from tasks.pretrain import pretrain_task
    from tasks.training import retry_unless_bad_input

    build_cache(small_synth.out, tmp_path / "cache", config=CacheConfig(image_size=56))
    suite = {
        "name": "pretrain-retries",
        "variants": ["multitask_pretrained"],
        "retries": 2,
        "pretrain": {"root": str(tmp_path / "celeba-not-here")},  # bad input: fails at once
    }
    config = load_config(None, TINY_TRAIN).model_dump(mode="json")

    @task(retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
    def crashes() -> None:
        raise RuntimeError("a lost connection, a killed process: worth another try")

    @flow
    def crashing() -> None:
        crashes.with_options(retries=2)()

    def task_runs(state: Any) -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )

    with prefect_test_harness(server_startup_timeout=600):
        state = suite_flow(
            str(tmp_path / "cache"), suite, config, str(tmp_path / "runs"), return_state=True
        )
        assert state.is_failed()
        (pre,) = [r for r in task_runs(state) if r.name.startswith("pretrain-")]
        crash_state = crashing(return_state=True)
        assert crash_state.is_failed()
        (crash,) = task_runs(crash_state)
    assert pretrain_task.retry_condition_fn is retry_unless_bad_input  # the folds' condition
    assert pre.state is not None
    assert pre.state.is_failed()
    assert pre.empirical_policy.retries == 2
    assert pre.run_count == 1  # a missing download is not retried
    assert crash.run_count == 3  # a crash is: retries + 1 runs
