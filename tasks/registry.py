"""The suite's models in the MLflow Model Registry: per variant, the best fold's model.

"Best" is the fold whose selected epoch scored highest on its own validation part (the metric
that picked the epoch, `train.select_metric`), never on a test fold: choosing by test accuracy
would be the seed's leakage again. The model is logged to the variant's parent run as a pyfunc
(`tasks.serving`: checkpoint, preprocessing and code together), registered as a version of
`agegender-<variant>`, and given the alias `champion`, so `models:/agegender-multitask@champion`
is what `agegender predict` and `mlflow models serve` use. A rerun whose best fold is the same
reuses that version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender.predict import Predictor
from agegender.train import RunError, selection_score
from tasks import TrackingError
from tasks.folds import latest_folds
from tasks.tracking import Tracker

ALIAS = "champion"


def registered_name(variant: str) -> str:
    return f"agegender-{variant}"


def _score(tracker: Tracker, run: Run) -> float | None:
    """The fold's validation score (higher is better); runs logged before the score was a
    metric get it from their result.json."""
    if "selection_score" in run.data.metrics:
        return float(run.data.metrics["selection_score"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download(f"runs:/{run.info.run_id}/result.json", Path(tmp))
            summary = json.loads(path.read_text())
            return selection_score(summary["selected_by"].removeprefix("val "), summary["val"])
        except (TrackingError, OSError, KeyError, ValueError, RunError):
            return None


def _selected_by(run: Run) -> str:
    """What the champion was chosen by: the validation score of each fold's tested weights."""
    metric = run.data.params.get("train.select_metric", "loss")
    tested = run.data.params.get("train.test_at", "best_val")
    return f"val {metric}" + (" of the final checkpoint" if tested == "final" else "")


@task(task_run_name="register-{variant}", cache_policy=NO_CACHE)
def register_champion_task(
    variant: str, suite: str, run_root: str, parent_id: str
) -> dict[str, Any] | None:
    """Register the variant's best fold (by validation) and point `champion` at it."""
    log = get_run_logger()
    tracker = Tracker(suite, Path(run_root))
    latest = latest_folds(tracker, parent_id)
    scores = {r.info.run_id: _score(tracker, r) for r in latest.values()}
    scored = [r for r in latest.values() if scores[r.info.run_id] is not None]
    if not scored:
        log.warning(f"{variant}: no fold run has its validation numbers; nothing registered")
        return None
    best = max(scored, key=lambda r: scores[r.info.run_id] or 0.0)
    fold, run_id = best.data.tags["fold"], best.info.run_id
    name = registered_name(variant)
    same = [v for v in tracker.versions(name, parent_id) if v.tags.get("fold_run_id") == run_id]
    if same:
        version = str(same[0].version)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = tracker.download(f"runs:/{run_id}/best.pt", Path(tmp))
            predictor = Predictor.load(checkpoint, "cpu")
            metadata = {
                "variant": variant,
                "fold": int(fold),
                "fold_run_id": run_id,
                "task": best.data.tags.get("task", ""),
                "selected_by": _selected_by(best),
                "preprocessing": predictor.preprocessing(),
            }
            artifact_path = f"model-fold{fold}"
            tracker.log_pyfunc(parent_id, checkpoint, artifact_path, metadata)
        tags = {
            "variant": variant,
            "suite": suite,
            "fold": fold,
            "fold_run_id": run_id,
            "selection_score": f"{scores[run_id]:.6f}",
            "selected_by": metadata["selected_by"],
        }
        tags |= {k: f"{v:.4f}" for k, v in best.data.metrics.items() if k.startswith("test_")}
        version = tracker.register(parent_id, artifact_path, name, tags)
    tracker.set_alias(name, ALIAS, version)
    uri = f"models:/{name}@{ALIAS}"
    log.info(f"{variant}: fold {fold} (best validation) is {name} version {version}, {uri}")
    return {"variant": variant, "name": name, "version": version, "fold": int(fold), "uri": uri}
