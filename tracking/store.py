"""Every MLflow call of the project, in one place; callers get `tracking.schema` records.

Runs are addressed by id through `MlflowClient` (no global "active run"), so folds logging from
several threads cannot mix their runs. With `MLFLOW_TRACKING_URI` unset, tracking goes to a
SQLite store and a local artifact folder under the suite's run directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from mlflow.artifacts import download_artifacts
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deployments.services import mlflow_problem
from tracking import TrackingError
from tracking.schema import (
    DATASET_CONTEXT,
    VIEW_KEY,
    DataInput,
    RunRecord,
    VersionRecord,
    experiment_tags,
    source_tags,
)

T = TypeVar("T")
_PARAM_MAX = 6000
# What a served model imports (mlflow brings pandas and the scoring server).
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pillow",
    "pydantic",
    "pyyaml",
    "opencv-python-headless",
)
_FINAL = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}
# The URL parameter that picks the MLflow UI's model-training layout (MLflow 3.17's JS bundle,
# mlflow/server/js/build/static/js: else the browser's own choice, GenAI by default).
WORKFLOW = "workflowType=machine_learning"
UI_PORT_VAR = "AGEGENDER_MLFLOW_UI_PORT"


class Tracker:
    """A tracking server (or local store) and the suite's experiment in it."""

    def __init__(self, experiment: str | None, run_root: Path) -> None:
        """`experiment` None: a client of the store for the registry and downloads only."""
        run_root = Path(run_root).resolve()
        self.uri = store_uri(run_root)
        self.local = "MLFLOW_TRACKING_URI" not in os.environ
        self.local_store = not self.uri.startswith(("http://", "https://"))
        run_root.mkdir(parents=True, exist_ok=True)
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment or ""
        self.experiment_id = ""
        if experiment is not None:
            self.experiment_id = self._retry(lambda: self._experiment(experiment, run_root))

    def _retry(self, call: Callable[[], T], attempts: int = 8) -> T:
        """Transient store errors (a restarting server, a locked SQLite file) are retried;
        answers that retrying cannot change (no such run or model, a bad value) are not."""
        for i in range(attempts):
            try:
                return call()
            except MlflowException as exc:
                if i == attempts - 1 or exc.error_code in _FINAL:
                    raise TrackingError(f"MLflow at {self.uri}: {exc.message}") from exc
                time.sleep(min(2**i, 10))
        raise AssertionError("unreachable")

    def _experiment(self, name: str, run_root: Path) -> str:
        """The experiment, created as model training with our runs view (`experiment_tags`);
        one made before those tags existed (or by hand) gets those it lacks: a kind or a view
        someone chose in the UI stays."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            for key, value in experiment_tags().items():
                if key not in found.tags:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return str(found.experiment_id)
        location = (run_root / "mlartifacts" / name).as_uri() if self.local else None
        return str(
            self.client.create_experiment(name, artifact_location=location, tags=experiment_tags())
        )

    def ui_base(self) -> str:
        """Where the MLflow UI serves this store: the tracking server itself, or (any other
        store: SQLite, a folder) where `ui_command`'s `mlflow ui` listens (`ui_port`)."""
        if self.local_store:
            return f"http://127.0.0.1:{ui_port()}"
        return self.uri.rstrip("/")

    def ui_url(self, route: str = "") -> str:
        """A page of the MLflow UI (`route`: e.g. `/runs/ID` under the experiment). MLflow
        3.17's UI picks its GenAI or model-training layout by the browser's workflow switch
        (GenAI on a fresh browser), not by the experiment's kind, so every link we print says
        `workflowType=machine_learning`."""
        return f"{self.ui_base()}/#{route}?{WORKFLOW}"

    def experiment_url(self) -> str:
        """The experiment's runs table, in our view (`tracking.schema.RUNS_VIEW`: the test
        metrics as columns)."""
        view = f"&viewStateShareKey={VIEW_KEY}"
        return self.ui_url(f"/experiments/{self.experiment_id}/runs") + view

    def run_url(self, run_id: str) -> str:
        return self.ui_url(f"/experiments/{self.experiment_id}/runs/{run_id}")

    def version_url(self, name: str, version: str) -> str:
        return self.ui_url(f"/models/{quote(name)}/versions/{version}")

    def ui_command(self) -> str:
        """How to open the experiment: `mlflow ui` on the store, then the address (any store
        but a tracking server); a tracking server's address as it is."""
        if self.local_store:
            return f"{self.serve_command()}, then open {self.experiment_url()}"
        return f"open {self.experiment_url()}"

    def serve_command(self) -> str:
        """The `mlflow ui` command that serves a local store where `ui_base` points."""
        return f"mlflow ui --backend-store-uri '{self.uri}' --host 127.0.0.1 --port {ui_port()}"

    def find(self, tags: Mapping[str, str], finished_only: bool = True) -> RunRecord | None:
        """The newest run carrying all `tags` (and FINISHED unless asked otherwise)."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if finished_only:
            clauses.append("attributes.status = 'FINISHED'")
        runs = self._retry(
            lambda: self.client.search_runs(
                [self.experiment_id],
                " and ".join(clauses),
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
        )
        return _record(runs[0]) if runs else None

    def find_or_start(
        self, name: str, tags: Mapping[str, str], extra: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """The run with `tags` (whatever its status: a rerun adds to it), else a new one that
        also carries `extra`; and whether it is new."""
        found = self.find(tags, finished_only=False)
        if found is not None:
            return found.run_id, False
        return self.start(name, dict(tags) | dict(extra or {})), True

    def finished(self, tags: Mapping[str, str]) -> RunRecord | None:
        """The newest FINISHED run with `tags`; a newer one still RUNNING belongs to a killed
        process, so it is marked KILLED first (a rerun then trains or resumes it)."""
        latest = self.find(tags, finished_only=False)
        if latest is not None and latest.status == "RUNNING":
            self.finish(latest.run_id, status="KILLED")
        return self.find(tags)

    def start(self, name: str, tags: Mapping[str, str], parent_id: str | None = None) -> str:
        all_tags = source_tags() | dict(tags)
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self._retry(
            lambda: self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        )
        return str(run.info.run_id)

    def reopen(self, run_id: str, tags: Mapping[str, str]) -> RunRecord | None:
        """Run `run_id` RUNNING again, if it is this experiment's, unfinished (killed, failed) and
        carries `tags`: a resumed training continues its own run. None: start a new one (it was
        deleted, finished, is another store's or another run's)."""
        try:
            run = self._retry(lambda: self.client.get_run(run_id))
        except TrackingError:
            return None
        found = _record(run)
        if (
            run.info.experiment_id != self.experiment_id
            or run.info.lifecycle_stage != "active"
            or found.status == "FINISHED"
            or any(found.tags.get(k) != v for k, v in tags.items())
        ):
            return None
        self._retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        return found

    def get(self, run_id: str) -> RunRecord:
        return _record(self._retry(lambda: self.client.get_run(run_id)))

    def children(self, parent_id: str) -> list[RunRecord]:
        """The parent's FINISHED child runs, oldest first."""
        query = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"
        runs = self._retry(
            lambda: self.client.search_runs([self.experiment_id], query, max_results=1000)
        )
        return sorted(map(_record, runs), key=lambda r: r.start_time)

    def latest_folds(self, parent_id: str) -> dict[tuple[int, int], RunRecord]:
        """(fold, seed) -> the parent's newest FINISHED run of it (a rerun after a crash logs a
        second one)."""
        latest = {(r.fold, r.seed): r for r in self.children(parent_id)}
        return dict(sorted(latest.items()))

    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float | None] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        now = int(time.time() * 1000)
        p = [Param(k, str(v)[:_PARAM_MAX]) for k, v in (params or {}).items()]
        m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self._batches(run_id, m, p, t)

    def log_history(self, run_id: str, history: Iterable[Mapping[str, Any]]) -> None:
        """Per-epoch numbers as metric series (step = epoch): the MLflow UI draws the curves.
        All carry the time of this call: an epoch logged as it ends (live curves) its real
        time, epochs logged late (e.g. before a resume point) the catch-up's."""
        now = int(time.time() * 1000)
        metrics = [m for h in history for m in epoch_metrics(h, now)]
        self._batches(run_id, metrics, [], [])

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps of metric `key` the run holds (which epochs a resumed run has)."""
        history = self._retry(lambda: self.client.get_metric_history(run_id, key))
        return {int(m.step) for m in history}

    def log_inputs(self, run_id: str, inputs: Iterable[DataInput]) -> None:
        """The data a run used, for MLflow's dataset view (`tracking.schema.data_inputs`)."""
        datasets = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type="local",
                    source=d.source,
                    profile=json.dumps(dict(d.profile)),
                ),
                tags=[InputTag(DATASET_CONTEXT, d.context)],
            )
            for d in inputs
        ]
        if datasets:
            self._retry(lambda: self.client.log_inputs(run_id, datasets))

    def log_metrics(self, run_id: str, metrics: list[Metric], attempts: int = 8) -> None:
        """Metrics as they are (their own steps and times: `tracking.writer`'s queue);
        `attempts=1` for a caller that retries itself."""
        self._batches(run_id, metrics, [], [], attempts)

    def _batches(
        self, run_id: str, m: list[Metric], p: list[Param], t: list[RunTag], attempts: int = 8
    ) -> None:
        """log_batch within the REST API's limits (1000 metrics, 100 params, 100 tags)."""
        for i in range(max(len(m) // 1000, len(p) // 100, len(t) // 100) + 1):
            mb, pb, tb = (
                m[i * 1000 : (i + 1) * 1000],
                p[i * 100 : (i + 1) * 100],
                t[i * 100 : (i + 1) * 100],
            )

            def call(mb: list[Metric] = mb, pb: list[Param] = pb, tb: list[RunTag] = tb) -> None:
                self.client.log_batch(run_id, mb, pb, tb)

            if mb or pb or tb:
                self._retry(call, attempts)

    def artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self._retry(lambda: self.client.log_artifact(run_id, str(path), folder))

    def text(self, run_id: str, text: str, name: str) -> None:
        self._retry(lambda: self.client.log_text(run_id, text, name))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._retry(lambda: self.client.set_terminated(run_id, status))

    def register(
        self,
        run_id: str,
        artifact_path: str,
        name: str,
        tags: Mapping[str, str],
        descriptions: tuple[str, str] | None = None,
        model_id: str | None = None,
    ) -> str:
        """A version of registered model `name` from run `run_id` (once per run and source):
        the logged model `model_id` (`log_pyfunc`'s) if given, else the run's artifact folder
        `artifact_path`. `descriptions`: the registered model's and the version's."""
        model_text, version_text = descriptions or (None, None)
        models = self._retry(lambda: self.client.search_registered_models(f"name = '{name}'"))
        if not models:
            self._retry(lambda: self.client.create_registered_model(name, description=model_text))
        elif model_text and models[0].description != model_text:
            self._retry(lambda: self.client.update_registered_model(name, model_text))
        # A logged model is the source: `models:/<id>` on a server; in a local store its files'
        # place (MLflow 3.17's stores resolve `models:/<id>` through the process-wide tracking
        # URI, not this client's).
        source = f"runs:/{run_id}/{artifact_path}"
        if model_id and not self.local_store:
            source = f"models:/{model_id}"
        elif model_id:
            model = self._retry(lambda: self.client.get_logged_model(model_id))
            source = str(model.artifact_location)
        found = [
            v
            for v in self.versions(name, run_id)
            if v.source == source or v.source.endswith(f"/{artifact_path}")
        ]
        if found:
            return str(found[0].version)
        version = self._retry(
            lambda: self.client.create_model_version(
                name,
                source,
                run_id,
                tags=dict(tags),
                description=version_text,
                model_id=model_id,
            )
        )
        if model_id:
            self._link_version(model_id, name, str(version.version))
        return str(version.version)

    def _link_version(self, model_id: str, name: str, version: str) -> None:
        """The logged model lists its registered versions (`mlflow.modelVersions`, what the UI
        links by), as MLflow's `register_model` and its server do; once per version."""
        key = "mlflow.modelVersions"
        model = self._retry(lambda: self.client.get_logged_model(model_id))
        listed = json.loads(model.tags.get(key) or "[]")
        if not any(m.get("name") == name and str(m.get("version")) == version for m in listed):
            value = json.dumps([*listed, {"name": name, "version": version}])
            self._retry(lambda: self.client.set_logged_model_tags(model_id, {key: value}))

    def log_pyfunc(
        self,
        run_id: str,
        checkpoint: Path,
        artifact_path: str,
        metadata: Mapping[str, Any],
        heads: tuple[str, ...] = ("age", "gender"),
    ) -> str:
        """The checkpoint as an MLflow pyfunc model (`tracking.serving`): an MLflow 3 logged
        model named `artifact_path`, linked to run `run_id` (the run's Models), with a
        signature and an input example; the code travels with it, and the requirements are
        pinned to this environment's. Returns the logged model's id.

        MLflow's `log_model` needs the process-wide tracking URI (and a thread's active run), so
        its steps are taken here through this tracker's client."""
        import mlflow.pyfunc
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        from tracking.serving import AgeGenderModel, input_example, signature

        root = Path(__file__).resolve().parent.parent
        run = self._retry(lambda: self.client.get_run(run_id))
        model = self._retry(
            lambda: self.client.create_logged_model(
                run.info.experiment_id,
                name=artifact_path,
                source_run_id=run_id,
                tags={k: str(v) for k, v in metadata.items() if not isinstance(v, dict)},
                model_type="agegender",
            )
        )
        model_id = str(model.model_id)
        output = LoggedModelOutput(model_id, step=0)
        self._retry(lambda: self.client.log_outputs(run_id, [output]))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model"
                meta = Model(
                    artifact_path=model.artifact_location,
                    model_uuid=model_id,
                    run_id=run_id,
                    metadata=dict(metadata),
                    model_id=model_id,
                )
                mlflow.pyfunc.save_model(
                    path,
                    mlflow_model=meta,
                    python_model=AgeGenderModel(),
                    artifacts={"checkpoint": str(checkpoint)},
                    code_paths=[str(root / "agegender"), str(root / "tracking")],
                    pip_requirements=[f"{d}=={version(d)}" for d in SERVING_REQUIREMENTS],
                    model_config={"detect": True, "oversample": False, "device": "auto"},
                    signature=signature(heads),
                    input_example=input_example(),
                )
                for junk in path.rglob("__pycache__"):
                    shutil.rmtree(junk)
                self._retry(lambda: self.client.log_model_artifacts(model_id, str(path)))
        except BaseException:
            self._retry(
                lambda: self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            )
            raise
        self._retry(lambda: self.client.finalize_logged_model(model_id, LoggedModelStatus.READY))
        return model_id

    def versions(self, name: str, run_id: str) -> list[VersionRecord]:
        """The versions of `name` registered from run `run_id`."""
        found = self._retry(
            lambda: self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        )
        return [_version_record(v) for v in found]

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._retry(lambda: self.client.set_registered_model_alias(name, alias, version))

    def model_version(self, uri: str) -> ModelVersion:
        """The registered version behind `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
        return self._version(uri)

    def _version(self, uri: str) -> ModelVersion:
        name, sep, alias = uri.removeprefix("models:/").partition("@")
        if sep:
            return self._retry(lambda: self.client.get_model_version_by_alias(name, alias))
        name, _, version = name.partition("/")
        return self._retry(lambda: self.client.get_model_version(name, version))

    def run_of(self, uri: str) -> str:
        """The run behind `runs:/RUN_ID/...` or `models:/NAME/VERSION` / `models:/NAME@ALIAS`."""
        if uri.startswith("runs:/") and uri.removeprefix("runs:/").strip("/"):
            return uri.removeprefix("runs:/").strip("/").split("/")[0]
        if uri.startswith("models:/") and len(uri) > len("models:/"):
            return str(self._version(uri).run_id)
        raise ValueError(f"{uri}: not a runs:/RUN_ID/PATH or models:/NAME/VERSION|@ALIAS URI")

    def download(self, uri: str, dst: Path) -> Path:
        """A run's or model version's artifacts (file or folder) under `dst`."""
        if uri.startswith("models:/"):  # its files' place, so that only this tracking URI is used
            found = self._version(uri)
            uri = str(found.source)
            logged = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", uri)
            if logged:  # an MLflow 3 logged model (a server's versions name it so)
                model_id = logged.group(1)
                uri = str(
                    self._retry(lambda: self.client.get_logged_model(model_id)).artifact_location
                )
        dst.mkdir(parents=True, exist_ok=True)
        local = self._retry(
            lambda: download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.uri)
        )
        return Path(local)


def ui_port() -> int:
    """The port of `mlflow ui` on a local store: the printed command and every link agree on
    it (AGEGENDER_MLFLOW_UI_PORT, default 5000, MLflow's own)."""
    value = os.environ.get(UI_PORT_VAR) or "5000"
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{UI_PORT_VAR}={value!r}: not a port number (1 to 65535)")
    return int(value)


def store_uri(run_root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store under the run root."""
    local = f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or local


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the server, instead of retrying for minutes against nothing (once per
    process: `deployments.services.mlflow_problem`)."""
    problem = mlflow_problem(uri, timeout=timeout)
    if problem is not None:
        raise TrackingError(problem)


def retry_would_help(exc: BaseException) -> bool:
    """False for what `Tracker._retry` gives up on at once (no such run, a bad value): the
    store's answer, or its cause's; anything else (a server away, a locked SQLite file) is
    transient."""
    cause = exc if isinstance(exc, MlflowException) else exc.__cause__
    return not (isinstance(cause, MlflowException) and cause.error_code in _FINAL)


def epoch_metrics(record: Mapping[str, Any], timestamp: int) -> list[Metric]:
    step = int(record["epoch"])
    return [
        Metric(k, float(v), timestamp, step)
        for k, v in record.items()
        if k != "epoch" and isinstance(v, int | float)
    ]


def _record(run: Run) -> RunRecord:
    return RunRecord(
        run_id=str(run.info.run_id),
        name=str(run.info.run_name or ""),
        status=str(run.info.status),
        start_time=int(run.info.start_time or 0),
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
    )


def _version_record(v: ModelVersion) -> VersionRecord:
    return VersionRecord(
        name=str(v.name),
        version=str(v.version),
        run_id=str(v.run_id or ""),
        source=str(v.source or ""),
        tags=dict(v.tags or {}),
    )
