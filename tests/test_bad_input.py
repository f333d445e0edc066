"""Bad input ends in one `error:` line naming the file, never a traceback and never an empty
cache that fails later: at `prepare`, and in the commands that run Prefect flows."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agegender.adience import MetadataError, read_fold
from agegender.cache import CacheError, build_cache, build_source_cache
from agegender.config import CacheConfig
from agegender.sources import (
    CELEBA_ATTR_FILE,
    CELEBA_PARTITION_FILE,
    read_celeba,
    read_utkface,
)
from agegender.synth.adience import SynthResult
from deployments.layout import Ports
from deployments.stack import Stack
from tests.conftest import REPO, run_cli


def prefect_api_at(url: str) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


SMALL = CacheConfig(image_size=32, workers=1)


def _one_error_line(res: subprocess.CompletedProcess[str], *names: str) -> str:
    """The command failed with exactly one `error:` line, naming `names`, and that line is the
    only one that tells of the failure: no traceback, no Prefect ERROR record repeating it."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    (error,) = errors
    for name in names:
        assert name in error, error
    problem = error.removeprefix("error: ")
    assert [line for line in lines if problem[-40:] in line] == [error], res.stderr[-3000:]
    assert not [line for line in lines if "| ERROR" in line], res.stderr[-3000:]
    return error


# --- data that would build an empty cache --------------------------------------------------


@pytest.fixture
def adience(small_synth: SynthResult, tmp_path: Path) -> Path:
    """A private copy of the small synthetic Adience download, free to break."""
    return Path(shutil.copytree(small_synth.out, tmp_path / "adience"))


def _header_only(fold_file: Path) -> None:
    fold_file.write_text(fold_file.read_text().splitlines()[0] + "\n")


def test_a_header_only_fold_file_is_refused(adience: Path, tmp_path: Path) -> None:
    _header_only(adience / "fold_3_data.txt")
    with pytest.raises(MetadataError, match=r"fold_3_data.txt, line 2: no rows after the header"):
        read_fold(adience / "fold_3_data.txt", 3)
    with pytest.raises(MetadataError, match=r"fold_3_data.txt, line 2"):
        build_cache(adience, tmp_path / "cache", config=SMALL)
    assert not (tmp_path / "cache").exists()


def test_a_download_without_its_images_is_refused(adience: Path, tmp_path: Path) -> None:
    shutil.rmtree(adience / "aligned")
    (adience / "aligned").mkdir()
    with pytest.raises(CacheError, match=r"aligned: none of the \d+ images .* is there \(\w"):
        build_cache(adience, tmp_path / "cache", config=SMALL)
    assert not (tmp_path / "cache").exists()


def test_a_download_of_undecodable_images_is_refused(adience: Path, tmp_path: Path) -> None:
    build_cache(adience, tmp_path / "cache", config=SMALL)
    before = (tmp_path / "cache" / "manifest.json").read_text()
    for image in adience.glob("aligned/*/*.jpg"):
        image.write_bytes(b"not a jpeg")
    with pytest.raises(CacheError, match=r"none of the \d+ images could be decoded \(.*cannot"):
        build_cache(adience, tmp_path / "cache", config=SMALL)
    # the cache that was there is untouched
    assert (tmp_path / "cache" / "manifest.json").read_text() == before
    assert not list((tmp_path / "cache").glob("images.tmp-*"))


@pytest.fixture
def celeba(synth_celeba: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth_celeba, tmp_path / "celeba"))


def test_empty_celeba_lists_are_refused(celeba: Path, tmp_path: Path) -> None:
    (celeba / CELEBA_PARTITION_FILE).write_text("")
    with pytest.raises(MetadataError, match=rf"{CELEBA_PARTITION_FILE}, line 1: empty file"):
        build_source_cache("celeba", celeba, tmp_path / "cache", SMALL)
    (celeba / CELEBA_PARTITION_FILE).write_text("000001.jpg 0\n")
    header = (celeba / CELEBA_ATTR_FILE).read_text().splitlines()[1]
    (celeba / CELEBA_ATTR_FILE).write_text(f"0\n{header}\n")
    with pytest.raises(MetadataError, match=rf"{CELEBA_ATTR_FILE}, line 3: no image rows"):
        read_celeba(celeba)
    assert not (tmp_path / "cache").exists()


def test_a_celeba_download_whose_rows_are_all_skipped_is_refused(celeba: Path) -> None:
    shutil.rmtree(celeba / "img_align_celeba")
    (celeba / "img_align_celeba").mkdir()
    with pytest.raises(MetadataError, match=r"celeba: no usable image: all 160 rows .* skipped"):
        read_celeba(celeba)


def test_a_utkface_folder_of_malformed_names_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    for name in ("abc_0_0_x.jpg", "30_2_0_x.jpg", "img.jpg", "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "sub").mkdir()
    with pytest.raises(MetadataError) as err:
        read_utkface(tmp_path)
    assert str(err.value).startswith(f"{folder}: none of the 3 .jpg names is <age>_<gender>")
    assert "(30_2_0_x.jpg: gender must be 0 (male) or 1 (female)" in str(err.value)
    with pytest.raises(MetadataError, match="none of the 3"):
        build_source_cache("utkface", tmp_path, tmp_path / "cache", SMALL)
    assert not (tmp_path / "cache").exists()


@pytest.mark.integration
def test_prepare_refuses_what_would_be_an_empty_cache(
    adience: Path, celeba: Path, tmp_path: Path
) -> None:
    _header_only(adience / "fold_0_data.txt")
    (celeba / CELEBA_PARTITION_FILE).write_text("")
    utk = tmp_path / "utkface"
    utk.mkdir()
    for name in ("a.jpg", "b_c.jpg"):
        shutil.copy(next(celeba.glob("img_align_celeba/*.jpg")), utk / name)
    cases: list[tuple[list[str | Path], list[str]]] = [
        (["--data-root", adience], [f"{adience / 'fold_0_data.txt'}, line 2"]),
        (["--format", "celeba", "--data-root", celeba], [f"{celeba / CELEBA_PARTITION_FILE}"]),
        (["--format", "utkface", "--data-root", utk], [f"{utk}: none of the 2 .jpg names"]),
    ]
    for i, (args, names) in enumerate(cases):
        res = run_cli("prepare", *args, "--cache", tmp_path / f"cache{i}", "--workers", "1")
        _one_error_line(res, *names)
        assert not (tmp_path / f"cache{i}").exists()


# --- commands that run Prefect flows --------------------------------------------------------


def test_only_expected_failures_are_kept_off_the_console() -> None:
    """Bugs keep Prefect's records (with their tracebacks); bad input's are dropped, and so are
    the records that only repeat it (retry notices, final states)."""
    from flows.cli import ExpectedFailures

    quiet = ExpectedFailures((MetadataError,))

    def shown(msg: str, exc: Exception | None = None, name: str = "prefect.task_runs") -> bool:
        info = (type(exc), exc, None) if exc else None
        return quiet.filter(logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, info))

    bad = MetadataError("/data/list.txt", 5, "expected '<file> <partition>'")
    bug = KeyError("model")
    assert shown(f"Task run failed with exception: {bug!r} - Retries are exhausted", bug)
    assert shown(f"Finished in state Failed('Task run encountered an exception KeyError: {bug}')")
    assert not shown(f"Task run failed with exception: {bad!r} - Retry 1/2 will start")
    assert not shown(f"Task run failed with exception: {bad!r} - Retries are exhausted", bad)
    task_state = f"Task run encountered an exception MetadataError: {bad}"
    assert not shown(f"Finished in state Failed({task_state!r})")
    assert not shown(f"Encountered exception during execution: {bad!r}", name="prefect.flow_runs")
    flow_state = (
        f"Finished in state Failed('Flow run encountered an exception: MetadataError: {bad}')"
    )
    assert not shown(flow_state, name="prefect.flow_runs")
    assert shown("Beginning flow run 'x' for flow 'y'", name="prefect.flow_runs")
    assert shown("exception: MetadataError(...) in a library's own log", name="mlflow")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the flow commands below (each would otherwise start an
    ephemeral one, slowly, on a loaded machine); its API keeps the records the console drops.
    Started as the stack starts it (health check, generous start-up), on the test stack's ports
    shifted by 50 more, and stopped with its process group."""
    shift = 101 + int(os.environ.get("AGEGENDER_TEST_PORT_SHIFT", "0")) + 50
    server = Stack(tmp_path_factory.mktemp("prefect-server"), ports=Ports.shifted(shift))
    server.start("prefect", creds={})
    try:
        yield server.prefect_api
    finally:
        server.stop("prefect")


def _flow_cli(api: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """As `run_cli`, against the test's Prefect server."""
    env = os.environ | {"PREFECT_API_URL": api}
    cmd = [str(Path(sys.executable).with_name("agegender")), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)


@pytest.fixture(scope="module")
def flow_runs(
    prefect_server: str,
    small_synth: SynthResult,
    synth_celeba: Path,
    synth_utkface: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each bad input through `agegender pretrain` / `suite`, two at a time."""
    root = tmp_path_factory.mktemp("flows")
    celeba = Path(shutil.copytree(synth_celeba, root / "celeba"))
    lines = (celeba / CELEBA_ATTR_FILE).read_text().splitlines()
    lines[4] = "000003.jpg 1 -1 1"
    (celeba / CELEBA_ATTR_FILE).write_text("\n".join(lines) + "\n")
    empty = Path(shutil.copytree(synth_celeba, root / "celeba-empty"))
    (empty / CELEBA_PARTITION_FILE).write_text("")
    adience = Path(shutil.copytree(small_synth.out, root / "adience"))
    _header_only(adience / "fold_2_data.txt")
    small = root / "cache-32px"  # too small for the crop: the fold task fails in its thread
    build_cache(small_synth.out, small, config=SMALL)

    def pretrain(name: str, source: str, data: Path, *extra: str) -> list[str | Path]:
        run_root = root / name
        return ["pretrain", "--source", source, "--data-root", data, "--run-root", run_root,
                "--image-size", "56", "data.crop=48", "train.iterations=1", *extra]  # fmt: skip

    commands: dict[str, list[str | Path]] = {
        "malformed celeba list": pretrain("list", "celeba", celeba),
        "missing utkface folder": pretrain("missing", "utkface", root / "nowhere"),
        "empty validation part": pretrain(
            "val", "utkface", synth_utkface, "pretrain.val_fraction=0.001"
        ),
        "empty celeba partition": pretrain("partition", "celeba", empty),
        "suite, header-only fold": [
            *("suite", "--data-root", adience, "--run-root", root / "suite"),
            "suite.variants=[multitask]",
        ],
        "suite, a fold that cannot train": [
            *("suite", "--cache", small, "--run-root", root / "fold"),
            *("suite.variants=[multitask]", "suite.folds=[1]", "data.crop=48"),
        ],
        "suite, an image size the cache was not built at": [
            *("suite", "--cache", small, "--run-root", root / "size"),
            *("suite.image_size=56", "suite.variants=[multitask]", "suite.folds=[1]"),
            "data.crop=48",
        ],
        "debug": ["--debug", *pretrain("debug", "celeba", celeba)],
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_flow_cli, prefect_server, *c) for k, c in commands.items()}
        return {k: f.result() for k, f in futures.items()}


CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "malformed celeba list": lambda r: [
        f"{r / 'celeba' / CELEBA_ATTR_FILE}, line 5: expected a file name and 40 values"
    ],
    "missing utkface folder": lambda r: [f"{r / 'nowhere'}: UTKFace folder not found"],
    "empty validation part": lambda r: ["the utkface val part is empty"],
    "empty celeba partition": lambda r: [
        f"{r / 'celeba-empty' / CELEBA_PARTITION_FILE}, line 1: empty file"
    ],
    "suite, header-only fold": lambda r: [f"{r / 'adience' / 'fold_2_data.txt'}, line 2"],
    "suite, a fold that cannot train": lambda r: ["data.crop=48", "32 px"],
    # refused before any flow runs: without it, the folds would train on the cache's 32 px
    "suite, an image size the cache was not built at": lambda r: [
        f"suite.image_size=56, but the cache {r / 'cache-32px'} was built at 32 px",
        "add --data-root DIR to rebuild it at 56 px, or drop suite.image_size",
    ],
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CHECKS))
def test_flow_commands_end_bad_input_in_one_error_line(
    case: str, flow_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    res = flow_runs[case]
    root = Path(res.args[res.args.index("--run-root") + 1]).parent
    _one_error_line(res, *CHECKS[case](root))


@pytest.mark.integration
def test_the_prefect_server_keeps_the_tracebacks(
    prefect_server: str, flow_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """What the console leaves out is still in Prefect (its UI): the failed task run's log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterTaskRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    assert flow_runs["malformed celeba list"].returncode == 2
    with prefect_api_at(prefect_server), get_client(sync_client=True) as client:
        failed = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["pretrain-celeba"]))
        )
        ids = [t.id for t in failed if t.state is not None and t.state.is_failed()]
        assert ids
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=ids)))
    messages = "\n".join(log.message for log in logs)
    assert "Traceback" in messages
    assert "list_attr_celeba.txt, line 5" in messages


@pytest.mark.integration
def test_debug_shows_the_tracebacks(flow_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    res = flow_runs["debug"]
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert "Task run failed with exception: MetadataError" in res.stderr  # Prefect's own record
    last = res.stderr.rstrip().splitlines()
    assert any(line.startswith("agegender.adience.MetadataError: ") for line in last[-3:])
