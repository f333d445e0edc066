"""Fixtures: the real Adience metadata from ../shared (never committed), small synthetic sets."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tasks  # noqa: F401  (Prefect's defaults, generous start-up included, before Prefect loads)
from agegender.cache import build_cache
from agegender.config import CacheConfig
from agegender.synth.adience import SynthResult, write_synthetic
from agegender.synth.sources import write_synthetic_source
from deployments.layout import Ports
from deployments.services import basic_auth
from deployments.stack import Stack
from deployments.supervisor import startup_timeout

REPO = Path(__file__).resolve().parents[1]
# many short epochs on `tiny_cache` (85 training images, batches of 16: 6 iterations an epoch),
# so that a fold trains long enough to be watched
SHORT_EPOCHS = [
    "data.crop=48",
    "data.batch_size=16",
    "model.norm=batchnorm",
    "optim.name=adam",
    "optim.weight_decay=0",
    "train.patience=null",
    "train.tencrop=false",
]
SHARED = Path(os.environ.get("AGEGENDER_SHARED", REPO.parent / "shared")) / "adience"


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.skip(
            f"real Adience {sub} not found at {path}: these files are not part of the repository; "
            "put the shared/ folder beside the checkout (or set AGEGENDER_SHARED) to run this test"
        )
    return path


@pytest.fixture(scope="session")
def real_metadata() -> Path:
    return _shared("metadata")


@pytest.fixture(scope="session")
def lh_lists() -> Path:
    return _shared("levi_hassner_folds")


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """A small synthetic Adience download (5 folds x 24 rows, 64 px), shared read-only by tests."""
    return write_synthetic(
        tmp_path_factory.mktemp("synth"), size=64, per_fold=24, seed=3, workers=1
    )


@pytest.fixture(scope="session")
def tiny_cache(small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_synth` cached at 56 px (48 px crops): quick folds of many short epochs."""
    root = tmp_path_factory.mktemp("live-cache")
    build_cache(small_synth.out, root / "cache", config=CacheConfig(image_size=56, workers=1))
    return root / "cache"


@pytest.fixture(scope="session")
def learn_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set big enough to learn from: 5 x 400 rows, 56 px cache (48 px crops)."""
    root = tmp_path_factory.mktemp("learn")
    write_synthetic(root / "adience", size=72, per_fold=400, seed=11)
    build_cache(root / "adience", root / "cache", config=CacheConfig(image_size=56))
    return root / "cache"


@pytest.fixture(scope="session")
def synth_celeba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA download (160 images, 48 x 59 px), shared read-only by tests."""
    root = tmp_path_factory.mktemp("celeba")
    write_synthetic_source("celeba", root, n=160, size=48, seed=7)
    return root


@pytest.fixture(scope="session")
def synth_utkface(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic UTKFace download (160 images, 48 px), shared read-only by tests."""
    root = tmp_path_factory.mktemp("utkface")
    write_synthetic_source("utkface", root, n=160, size=48, seed=7)
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Users' photos: two synthetic faces side by side (a seed whose two faces the Haar cascade
    finds: it misses about a quarter of these cartoon faces), one with none, one corrupt file.
    `faces` says where the two faces were pasted."""
    from agegender.synth.photos import group_photo

    root = tmp_path_factory.mktemp("photos")
    two, faces = group_photo(2, 640, 320, seed=0)
    two.save(root / "two.jpg", quality=92)
    group_photo(0, 480, 360, seed=1)[0].save(root / "none.png")
    (root / "corrupt.jpg").write_bytes((root / "two.jpg").read_bytes()[:2000])
    return {"dir": root, "faces": faces}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed `agegender` console script, as a user runs it."""
    script = Path(sys.executable).with_name("agegender")
    assert script.is_file(), f"{script}: console script not installed (run `make venv`)"
    cmd = [str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


# --- the real service stack (S3, MLflow, Prefect server + worker), for integration tests --------

STACK_SUITE = "stack-e2e"
_STACK_CREDS: dict[str, str] = {}
# a few Adam steps of a small net: for tests that need trained runs, not good ones
TINY_TRAIN = [
    "data.crop=48",
    "optim.name=adam",
    "optim.weight_decay=0",
    "model.norm=batchnorm",
    "train.patience=null",
    "train.iterations=4",
    "train.tencrop=false",
]

# the tiny settings as `agegender suite` overrides, its iterations left to each test
TINY_ARGS = [a for a in TINY_TRAIN if not a.startswith("train.iterations=")]

STACK_TINY = {
    "data": {"crop": 48},
    "model": {"norm": "batchnorm"},
    "optim": {"name": "adam", "weight_decay": 0},
    "train": {"iterations": 6, "patience": None, "tencrop": False},
}


def scale_out_params(name: str, cache: Path, run_root: Path) -> dict[str, Any]:
    """A `cross_validate` deployment's parameters as the scale-out tests send them: the gender
    variant's folds 0 and 1 as flow runs of `train_fold`, tiny."""
    return {
        "variant": "gender",
        "cache_dir": str(cache),
        "run_root": str(run_root),
        "suite": {"name": name, "folds": [0, 1], "mode": "deployments"},
        "config": STACK_TINY,
    }


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A whole stack started by the project's own code, with fresh S3 credentials that only
    the servers get; this test process talks to it like any client (no S3 credentials)."""

    creds = {
        "AWS_ACCESS_KEY_ID": "agegender-" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
    }
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    _STACK_CREDS.update(creds)
    # ports shifted by 101: a developer's own stack (`make stack`) may run beside the tests
    # (AGEGENDER_TEST_PORT_SHIFT moves them again, for two test sessions on one machine)
    shift = 101 + int(os.environ.get("AGEGENDER_TEST_PORT_SHIFT", "0"))
    # on PostgreSQL, as the compose stack runs (AGEGENDER_TEST_DB=sqlite: the embedded one);
    # its run dir is outside pytest's private (0700) temp folder, so that PostgreSQL's own
    # user reaches its data folder when the tests run as root
    db = os.environ.get("AGEGENDER_TEST_DB", "postgres")
    run_dir = Path(tempfile.mkdtemp(prefix="agegender-test-stack-"))
    run_dir.chmod(0o711)
    # heartbeats every 30 s (Prefect's minimum): a killed fold is CRASHED after 90 s
    st = Stack(run_dir / "stack", ports=Ports.shifted(shift), db=db, heartbeat_s=30)
    try:
        st.up(progress=lambda m: print(f"stack: {m}"))
        for k in creds:
            del os.environ[k]
        yield st
    finally:
        st.down()
        shutil.rmtree(run_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prefect_api(st: Stack) -> Any:
    """In-process Prefect calls against the stack (Prefect reads PREFECT_API_URL at import, so
    setting the variable later would not do; nothing leaks into the other tests)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: st.prefect_api})


def client_env(st: Stack) -> dict[str, str]:
    """A client process's environment: the stack's URLs, a worker's credentials if it asks for
    them (from this process's environment), and no S3 credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | st.client_env() | st.auth_env()


def prefect_post(stack: Any, path: str, body: dict[str, Any]) -> Any:
    """A POST to the stack's Prefect REST API (its auth string if it asks); None for no body."""
    headers = {"Content-Type": "application/json"}
    if stack.auth:
        headers |= basic_auth(stack.auth_env()["PREFECT_API_AUTH_STRING"])
    req = urllib.request.Request(
        f"{stack.prefect_api}{path}",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
    return json.loads(data) if data else None


def flow_runs(stack: Any, body: dict[str, Any]) -> Any:
    """Flow runs matching a filter, straight from the Prefect REST API."""
    return prefect_post(stack, "/flow_runs/filter", body)


def suite_argv(cache: Path, run_root: Path, *extra: str) -> list[str]:
    """The `agegender suite` command line on a cache, into a run root."""
    script = Path(sys.executable).with_name("agegender")
    return [str(script), "suite", "--cache", str(cache), "--run-root", str(run_root), *extra]


def suite_cli(stack: Any, cache: Path, run_root: Path, *extra: str) -> subprocess.Popen[str]:
    """`agegender suite` as a client of the stack, output captured."""
    return subprocess.Popen(
        suite_argv(cache, run_root, *extra),
        cwd=REPO,
        env=client_env(stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def processes_of(flow_run_id: str) -> list[int]:
    """The processes running a flow run, found as an operator would (its environment); the
    project itself never looks at processes."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in env:
            found.append(int(proc.name))
    return found


# run as `nobody`: which of the given paths it opens (a file) or lists (a folder)
_OPENS = """
import json, os, sys
opened = []
for path in json.load(sys.stdin):
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
    except OSError:
        continue
    opened.append(path)
print(json.dumps(opened))
"""


def opened_by_nobody(paths: Iterable[Path]) -> list[str]:
    """Which of `paths` the user `nobody` reads (a file) or lists (a folder): what any other
    local user could see. The tests run as root, which may become it (`setpriv`)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another local user (`nobody`) needs root")
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    res = subprocess.run(
        [*as_nobody, sys.executable, "-c", _OPENS],
        input=json.dumps([str(p) for p in paths]),
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    opened: list[str] = json.loads(res.stdout)
    return opened


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the service stack run last: the servers then start late and run only as long
    as those tests need them (they stop at the end of the session)."""
    items.sort(key=lambda item: "stack" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def stack_creds(stack: Any) -> dict[str, str]:
    """The S3 credentials the stack's servers got (for checks made with boto3 only)."""
    return dict(_STACK_CREDS)


@pytest.fixture(scope="session")
def stack_suite(
    stack: Any, learn_cache: Path, synth_celeba: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The `suite` deployment triggered at tiny size (4 variants x 5 folds, pretraining on a
    synthetic CelebA first) and run by the stack's worker."""
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    run_root = tmp_path_factory.mktemp("stack-suite")
    params = {
        "cache_dir": str(learn_cache),
        "data_root": None,  # the cache is prepared (the deployment's default is /data/adience)
        "run_root": str(run_root),
        "suite": {
            "name": STACK_SUITE,
            "image_size": 56,
            "pretrain": {"root": str(synth_celeba), "overrides": ["train.iterations=3"]},
        },
        "config": STACK_TINY,
    }
    with prefect_api(stack):
        run = run_deployment("suite/suite", parameters=params, timeout=900, poll_interval=2)
    assert isinstance(run, FlowRun)
    assert run.state is not None
    assert run.state.is_completed(), (run.state, stack.log("worker"))
    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name(STACK_SUITE)
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], "tags.kind = 'parent'")
    return {
        "mlflow": stack.mlflow_url,
        "experiment_id": experiment.experiment_id,
        "parents": {r.data.tags["variant"]: r.info.run_id for r in parents},
        "run_root": run_root,
        "flow_run_id": str(run.id),
    }


@contextlib.contextmanager
def serving(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path, probe: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process started and waited for until `probe` answers 200 (a loaded machine takes
    minutes: `startup_timeout`), then stopped with the processes it started (its own session:
    `mlflow server` runs uvicorn as a child); the process is yielded (a test may kill it)."""
    with log.open("a") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=out, cwd=cwd, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_timeout()
        while True:
            assert proc.poll() is None, f"{cmd[0]} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {probe} answer:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(probe, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(30)
                break
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_serving(root: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A plain `mlflow server` (SQLite, local artifacts it serves) on `port`, as a team would run
    one; started again on the same `root` and port, it is the same server back."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", (root / "artifacts").as_uri()]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serving(cmd, env, root, root / "server.log", f"http://127.0.0.1:{port}/health") as proc:
        yield proc


SERVED_NAME = "agegender-served"


@pytest.fixture(scope="session")
def served_model_uri(
    small_synth: SynthResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A tiny trained model as the suite leaves one: a fold run (with its `config_hash` tag)
    that logged it as an MLflow pyfunc, registered as `agegender-served@champion` in a local
    SQLite store under `run_root`. For the model-server tests (`agegender serve`)."""
    from agegender.config import load_config
    from agegender.train import train_fold
    from tracking.store import Tracker

    root = tmp_path_factory.mktemp("served")
    build_cache(small_synth.out, root / "cache", config=CacheConfig(image_size=56, workers=1))
    config = load_config(None, [*TINY_TRAIN[:-2], "train.iterations=2", "train.tencrop=false"])
    checkpoint = train_fold(root / "cache", 0, config, root / "fold").out_dir / "best.pt"
    run_root = root / "runs"
    tracker = Tracker("served", run_root)
    run_id = tracker.start("fold 0", {"kind": "fold", "config_hash": config.hash()})
    model_id = tracker.log_pyfunc(run_id, checkpoint, "multitask-fold0", {"fold": 0})
    version = tracker.register(run_id, "multitask-fold0", SERVED_NAME, {}, None, model_id)
    tracker.set_alias(SERVED_NAME, "champion", version)
    tracker.finish(run_id)
    return {
        "uri": f"models:/{SERVED_NAME}@champion",
        "run_root": run_root,
        "name": SERVED_NAME,
        "version": version,
        "run_id": run_id,
        "config_hash": config.hash(),
        "checkpoint": checkpoint,
    }
