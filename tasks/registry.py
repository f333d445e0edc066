"""The suite's models in the MLflow Model Registry: per variant, the best fold's model.

"Best" is the fold whose selected epoch scored highest on its own validation part (the metric
that picked the epoch, `train.select_metric`), never on a test fold: choosing by test accuracy
would be the seed's leakage again. The model is logged to that fold's run as a pyfunc
(`tracking.serving`: checkpoint, preprocessing and code together; an MLflow 3 logged model
`<variant>-fold<k>` with a signature and an input example), registered from that run, with
descriptions and its parent run's id as a tag, as a version of `agegender-<variant>`, and given
the alias `champion`, so `models:/agegender-multitask@champion` is what `agegender predict` and
`mlflow models serve` use. A rerun whose best fold is the same reuses that version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender.predict import Predictor
from agegender.train import RunError, selected_value, selection_score
from tracking import TrackingError
from tracking.schema import (
    RunRecord,
    champion_descriptions,
    champion_tags,
    model_name,
    of_fold_run,
)
from tracking.store import Tracker

ALIAS = "champion"


def registered_name(variant: str) -> str:
    return f"agegender-{variant}"


def _score(tracker: Tracker, run: RunRecord) -> float | None:
    """The fold's validation score (higher is better); runs logged before the score was a
    metric get it from their result.json."""
    if "selection_score" in run.metrics:
        return float(run.metrics["selection_score"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download(f"runs:/{run.run_id}/result.json", Path(tmp))
            summary = json.loads(path.read_text())
            return selection_score(summary["selected_by"].removeprefix("val "), summary["val"])
        except (TrackingError, OSError, KeyError, ValueError, RunError):
            return None


def _selected_by(run: RunRecord) -> tuple[str, str]:
    """What the champion was chosen by (the validation score of each fold's tested weights),
    and that metric's name."""
    metric = run.params.get("train.select_metric", "loss")
    tested = run.params.get("train.test_at", "best_val")
    return f"val {metric}" + (" of the final checkpoint" if tested == "final" else ""), metric


@task(task_run_name="register-{variant}", cache_policy=NO_CACHE)
def register_champion_task(
    variant: str, suite: str, run_root: str, parent_id: str
) -> dict[str, Any] | None:
    """Register the variant's best fold (by validation) and point `champion` at it."""
    log = get_run_logger()
    tracker = Tracker(suite, Path(run_root))
    latest = tracker.latest_folds(parent_id)
    scores = {r.run_id: _score(tracker, r) for r in latest.values()}
    scored = [r for r in latest.values() if scores[r.run_id] is not None]
    if not scored:
        log.warning(f"{variant}: no fold run has its validation numbers; nothing registered")
        return None
    best = max(scored, key=lambda r: scores[r.run_id] or 0.0)
    fold, run_id = best.fold, best.run_id
    name = registered_name(variant)
    same = [v for v in tracker.versions(name, run_id) if of_fold_run(v, run_id)]
    if same:
        version = same[0].version
    else:
        selected_by, metric = _selected_by(best)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = tracker.download(f"runs:/{run_id}/best.pt", Path(tmp))
            predictor = Predictor.load(checkpoint, "cpu")
            metadata = {
                "variant": variant,
                "fold": fold,
                "fold_run_id": run_id,
                "parent_run_id": parent_id,
                "task": best.tags.get("task", ""),
                "selected_by": selected_by,
                "preprocessing": predictor.preprocessing(),
            }
            logged = model_name(variant, fold)
            heads = tuple(predictor.labels)
            model_id = tracker.log_pyfunc(run_id, checkpoint, logged, metadata, heads)
        value = selected_value(metric, scores[run_id] or 0.0)
        tags = champion_tags(variant, suite, best, value, selected_by, parent_id)
        texts = champion_descriptions(variant, suite, best, value, selected_by, len(scored))
        version = tracker.register(run_id, logged, name, tags, texts, model_id)
    tracker.set_alias(name, ALIAS, version)
    uri = f"models:/{name}@{ALIAS}"
    log.info(f"{variant}: fold {fold} (best validation) is {name} version {version}, {uri}")
    return {"variant": variant, "name": name, "version": version, "fold": fold, "uri": uri}
