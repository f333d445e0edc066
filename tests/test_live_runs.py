"""A fold's MLflow run is live: RUNNING from the start, each epoch logged as it ends (read over
the REST API while the fold trains), system metrics and the data it used; a killed fold's rerun
continues the same run. Real MLflow (a server, or the SQLite store), real `agegender suite`."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import expect

from agegender.cache import open_cache
from tasks.training import RUN_ID_FILE, TrackedRun, catch_up, open_run
from tests.conftest import REPO, SHORT_EPOCHS, free_port, mlflow_serving, suite_argv
from tracking.store import Tracker

SAMPLING_S = "1"  # MLflow's system-metrics interval for these folds (its default is 10 s)


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One MLflow REST call (GET without a body, POST with one)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path,
        data,
        {"Content-Type": "application/json"},
        method="GET" if data is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain `mlflow server` (SQLite, local artifacts it serves), as a team would run one."""
    port = free_port()
    with mlflow_serving(tmp_path_factory.mktemp("mlflow-server"), port):
        yield f"http://127.0.0.1:{port}"


def _suite(cache: Path, run_root: Path, *extra: str) -> list[str]:
    one_fold = ["suite.variants=[gender]", "suite.folds=[0]", "suite.register_champions=false"]
    return suite_argv(cache, run_root, *one_fold, *SHORT_EPOCHS, *extra)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": SAMPLING_S} | extra


@pytest.mark.integration
def test_a_training_fold_is_read_live_over_the_rest_api(
    tiny_cache: Path, mlflow_server: str, tmp_path: Path
) -> None:
    url = mlflow_server
    env = _env(MLFLOW_TRACKING_URI=url)
    run_root = tmp_path / "runs"
    cmd = _suite(tiny_cache, run_root, "suite.name=live", "train.iterations=240")
    log = tmp_path / "suite.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + 600
        while seen is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                exp = _api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=live")
            except urllib.error.HTTPError:
                continue  # the suite has not made its experiment yet
            body = {
                "experiment_ids": [exp["experiment"]["experiment_id"]],
                "filter": "tags.kind = 'fold'",
            }
            for run in _api(url, "/api/2.0/mlflow/runs/search", body).get("runs", []):
                metrics = {m["key"]: m for m in run["data"].get("metrics", [])}
                if run["info"]["status"] == "RUNNING" and "val_loss" in metrics:
                    seen = {"run": run, "metrics": metrics, "alive": proc.poll() is None}
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    output = log.read_text()
    assert rc == 0, output[-3000:]
    assert seen is not None, f"no RUNNING fold run with an epoch metric was seen\n{output[-3000:]}"
    assert seen["alive"]
    run_id = seen["run"]["info"]["run_id"]
    epochs = int(
        json.loads(next(run_root.glob("live/gender/fold0-*/result.json")).read_text())["epochs"]
    )
    assert 1 <= seen["metrics"]["val_loss"]["step"] < epochs  # read mid-training

    run = _api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED"
    history = _api(url, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val_loss")
    points = sorted(history["metrics"], key=lambda m: int(m.get("step", 0)))
    assert [int(m["step"]) for m in points] == list(range(1, epochs + 1))
    stamps = [int(m["timestamp"]) for m in points]
    assert all(a < b for a, b in itertools.pairwise(stamps)), stamps
    assert int(run["info"]["start_time"]) < stamps[0] <= stamps[-1] < int(run["info"]["end_time"])

    # system metrics: MLflow's monitor sampled CPU and memory while the fold trained
    cpu = _api(
        url,
        f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}"
        "&metric_key=system/cpu_utilization_percentage",
    )["metrics"]
    print(f"system-metric samples: {len(cpu)}, epochs: {epochs}")
    assert len(cpu) >= 3
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert "system/system_memory_usage_megabytes" in keys

    # the data it trained, selected and tested on
    fingerprint = open_cache(tiny_cache).fingerprint
    inputs = run["inputs"]["dataset_inputs"]
    contexts = {}
    for i in inputs:
        tags = {t["key"]: t["value"] for t in i.get("tags", [])}
        contexts[tags["mlflow.data.context"]] = i["dataset"]
    assert set(contexts) == {"train", "validation", "test"}
    metrics = {m["key"]: float(m["value"]) for m in run["data"]["metrics"]}
    for context, size in (("train", "n_train"), ("validation", "n_val"), ("test", "n_test")):
        dataset = contexts[context]
        assert dataset["digest"] == fingerprint[:8]
        assert dataset["name"] == f"adience fold 0 ({context}, gender)"
        assert dataset["source_type"] == "local"
        assert json.loads(dataset["profile"])["num_rows"] == metrics[size]
    # its run id is kept beside the checkpoint, for a resume
    (kept,) = run_root.glob(f"live/gender/fold0-*/{RUN_ID_FILE}")
    assert kept.read_text().strip() == run_id

    # as a user sees it: the run page's epoch curves and its system metrics, in Chromium
    from tests.test_mlflow_ui import ARTIFACTS, TIMEOUT_MS, browser_page, full_page_screenshot

    page_url = f"{url}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(tmp_path) as page:
        for tab, wanted, shot in (
            ("model-metrics", "gender fold 0 (val_loss)", "mlflow-fold-run-curves.png"),
            ("system-metrics", "cpu_utilization_percentage", "mlflow-fold-run-system.png"),
        ):
            (ARTIFACTS / shot).unlink(missing_ok=True)
            page.goto(f"{page_url}/{tab}")
            page_body = page.locator("body")
            expect(page_body).to_contain_text("gender fold 0", timeout=TIMEOUT_MS)
            # charts are drawn as they scroll into view (val_loss is below best..n_val)
            for _ in range(40):
                if wanted in page_body.inner_text():
                    break
                page.mouse.move(900, 600)
                page.mouse.wheel(0, 600)
                page.wait_for_timeout(500)
            expect(page_body).to_contain_text(wanted, timeout=TIMEOUT_MS)
            full_page_screenshot(page, ARTIFACTS / shot)
            assert (ARTIFACTS / shot).stat().st_size > 10_000, f"{shot}: suspiciously small"


@pytest.mark.integration
def test_a_killed_fold_continues_its_own_run(tiny_cache: Path, tmp_path: Path) -> None:
    run_root = tmp_path / "runs"
    env = _env()
    cmd = _suite(tiny_cache, run_root, "train.iterations=240")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    before: list[int] = []
    run_id = ""
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(before) < 3:
            assert proc.poll() is None, "the suite ended before it was killed"
            time.sleep(0.3)
            kept = list(run_root.glob(f"agegender/gender/fold0-*/{RUN_ID_FILE}"))
            if kept:
                run_id = kept[0].read_text().strip()
                before = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Prefect server it started
        proc.wait()
    assert len(before) >= 3, "no epochs were logged live"
    out = next(run_root.glob("agegender/gender/fold0-*"))
    assert not (out / "result.json").exists(), "killed too late: the fold had finished"
    assert client.get_run(run_id).info.status == "RUNNING"  # its process died

    rerun = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=900)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "gender fold 0: resuming from its checkpoint" in output
    exp = client.get_experiment_by_name("agegender")
    assert exp is not None
    (fold,) = client.search_runs([exp.experiment_id], "tags.kind = 'fold'")
    assert (fold.info.run_id, fold.info.status) == (run_id, "FINISHED")
    epochs = int(json.loads((out / "result.json").read_text())["epochs"])
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # every epoch once, none lost
    system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert system
    assert len({m.step for m in system}) == len(system)  # the monitor continued its steps


def test_a_run_is_reopened_only_when_it_is_that_trainings_unfinished_run(tmp_path: Path) -> None:
    tracker = Tracker("reopen", tmp_path)
    tags = {"kind": "fold", "fold": "0", "config_hash": "abc"}
    run = TrackedRun(tracker, "gender fold 0", tags, tmp_path / "out")
    first = open_run(run, tags | {"device": "cpu"}, {"train.device": "cpu", "train.seed": 0})
    assert (tmp_path / "out" / RUN_ID_FILE).read_text().strip() == first
    # its process died: the next lookup closes it as KILLED, and the resume reopens it
    assert tracker.finished(tags) is None
    assert tracker.client.get_run(first).info.status == "KILLED"
    # resumed on another device: the first value of a param stays (MLflow refuses a change)
    again = open_run(run, tags, {"train.device": "cuda:0", "train.seed": 0})
    assert again == first
    got = tracker.client.get_run(first)
    assert (got.info.status, got.data.params["train.device"]) == ("RUNNING", "cpu")
    tracker.finish(first)
    # a FINISHED run is never reopened (a new parent's fold, say): a new run
    assert open_run(run, tags, {}) != first
    # nor one with other tags, or one deleted
    newest = (tmp_path / "out" / RUN_ID_FILE).read_text().strip()
    tracker.finish(newest, status="KILLED")
    assert tracker.reopen(newest, tags | {"fold": "1"}) is None
    tracker.client.delete_run(newest)
    assert tracker.reopen(newest, tags) is None
    assert tracker.reopen("0" * 32, tags) is None


def test_epochs_the_run_lacks_are_caught_up_from_history(tmp_path: Path) -> None:
    tracker = Tracker("catch-up", tmp_path)
    run_id = tracker.start("fold", {})
    history = [
        {"epoch": e, "lr": 0.1, "iteration": 6 * e, "val_loss": 1.0 / e, "best": True}
        for e in (1, 2, 3)
    ]
    tracker.log_history(run_id, history[:1])
    (tmp_path / "history.json").write_text(json.dumps(history))
    catch_up(tracker, run_id, tmp_path)
    catch_up(tracker, run_id, tmp_path)  # nothing twice
    steps = [m.step for m in tracker.client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3]
