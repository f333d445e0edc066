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

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender.predict import Predictor
from tasks.tracking import Tracker

ALIAS = "champion"


def registered_name(variant: str) -> str:
    return f"agegender-{variant}"


@task(task_run_name="register-{variant}", cache_policy=NO_CACHE)
def register_champion_task(
    variant: str, suite: str, run_root: str, parent_id: str
) -> dict[str, Any] | None:
    """Register the variant's best fold (by validation) and point `champion` at it."""
    log = get_run_logger()
    tracker = Tracker(suite, Path(run_root))
    latest: dict[str, Any] = {}
    for child in sorted(tracker.children(parent_id), key=lambda r: r.info.start_time):
        latest[child.data.tags["fold"]] = child
    scored = [r for r in latest.values() if "selection_score" in r.data.metrics]
    if not scored:
        log.warning(f"{variant}: no fold run has a selection_score; nothing registered")
        return None
    best = max(scored, key=lambda r: r.data.metrics["selection_score"])
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
                "selected_by": best.data.params.get("train.select_metric", ""),
                "preprocessing": predictor.preprocessing(),
            }
            artifact_path = f"model-fold{fold}"
            tracker.log_pyfunc(parent_id, checkpoint, artifact_path, metadata)
        tags = {
            "variant": variant,
            "suite": suite,
            "fold": fold,
            "fold_run_id": run_id,
            "selection_score": f"{best.data.metrics['selection_score']:.6f}",
            "selected_by": f"val {metadata['selected_by']}",
        }
        tags |= {k: f"{v:.4f}" for k, v in best.data.metrics.items() if k.startswith("test_")}
        version = tracker.register(parent_id, artifact_path, name, tags)
    tracker.set_alias(name, ALIAS, version)
    uri = f"models:/{name}@{ALIAS}"
    log.info(f"{variant}: fold {fold} (best validation) is {name} version {version}, {uri}")
    return {"variant": variant, "name": name, "version": version, "fold": int(fold), "uri": uri}
