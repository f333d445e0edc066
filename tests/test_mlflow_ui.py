"""The MLflow UI, in a real headless browser, compares the suite's four parent runs.

Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium) driven by Playwright's Python
package; Playwright's own browser downloads are never used (`playwright install` is not needed).
The page is the one the UI links to from the experiment view's "Compare" button; the test checks
that the runs, the metric names and the values (formatted as the UI formats them) are on it, and
leaves a full-page screenshot in runs/test-artifacts/mlflow-compare.png for a human to look at.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from mlflow import MlflowClient
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from deployments.supervisor import startup_timeout
from tests.conftest import STACK_SUITE

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # a page on a loaded machine; failures show sooner than start-up limits
VARIANTS = ("multitask", "multitask_pretrained", "age", "gender")  # column order on the page
METRIC_NAMES = ("test_age_acc_mean", "test_gender_acc_mean")
MAX_HEIGHT = 8_000  # px: the screenshot's cap
# MLflow 3 opens its assistant side panel on a fresh profile's first visit; keep it shut so the
# screenshot shows the comparison at full width (stale keys in a later MLflow just do nothing).
NO_ASSISTANT = """
try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (e) {}
"""
# How far the page's own scroll container (MLflow scrolls <main>, not the document) overflows.
OVERFLOW_JS = """
() => Math.max(0, ...[...document.querySelectorAll("*")]
  .filter((e) => ["auto", "scroll"].includes(getComputedStyle(e).overflowY)
                 && e.clientHeight > window.innerHeight / 2)
  .map((e) => e.scrollHeight - e.clientHeight))
"""


def ui_metric(value: float) -> str:
    """A metric value as the MLflow UI prints it (`Utils.formatMetric` in mlflow/server/js)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    if abs(value) < 1e-3:  # JS toExponential(3): 1.234e-4
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    rounded = math.floor(value * scale + 0.5) / scale  # JS Math.round: halves go up
    text = repr(rounded)  # shortest round-trip digits, as JS Number.toString
    return text.removesuffix(".0")


def compare_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The UI's compare route, as its own links build it (`getCompareRunPageRoute`)."""

    def as_json(values: Sequence[str]) -> str:
        return quote(json.dumps(list(values), separators=(",", ":")), safe="[],")

    query = f"runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


def row_cells(page: Page, header: str) -> list[str]:
    """The non-empty cells after `header` in the run-details table row it starts."""
    row = page.locator("tr", has=page.locator("th, td", has_text=header)).first
    texts = [t.strip() for t in row.locator("th, td").all_inner_texts()]
    return [t for t in texts if t and t != header]


def settled_overflow(page: Page) -> int:
    """OVERFLOW_JS once two reads 250 ms apart agree (collapse animations, plotly re-layouts)."""
    last = -1
    for _ in range(20):
        now = int(page.evaluate(OVERFLOW_JS))
        if now == last:
            break
        last = now
        page.wait_for_timeout(250)
    return last


def full_page_screenshot(page: Page, path: Path) -> None:
    """Grow the viewport until nothing scrolls, so the screenshot holds the whole comparison.

    The Artifacts section's previews are as tall as the viewport (they would grow with it for
    ever), so it is collapsed first; best effort: if that fails, the growth is merely capped.
    """
    header = page.get_by_role("button", name="Artifacts", exact=True)
    with contextlib.suppress(PlaywrightError):
        if header.get_attribute("aria-expanded", timeout=5_000) == "true":
            header.click(timeout=5_000)
            # the section's body: hidden once its collapse animation has ended
            expect(header.locator("xpath=following-sibling::*[1]")).to_be_hidden(timeout=5_000)
    for _ in range(3):
        overflow = settled_overflow(page)
        size = page.viewport_size or {"width": 1800, "height": 1000}
        if overflow <= 0 or size["height"] >= MAX_HEIGHT:
            break
        height = min(size["height"] + overflow, MAX_HEIGHT)
        page.set_viewport_size({"width": size["width"], "height": height})
    settled_overflow(page)
    page.screenshot(path=str(path), full_page=True, animations="disabled")


@pytest.mark.integration
def test_mlflow_ui_compares_the_suites_parent_runs(
    stack_suite: dict[str, Any], tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's browser (apt-get install -y chromium)")
    base: str = stack_suite["mlflow"]
    experiment_id = str(stack_suite["experiment_id"])
    parents: dict[str, str] = stack_suite["parents"]
    assert set(parents) == set(VARIANTS), parents
    run_ids = [parents[variant] for variant in VARIANTS]

    client = MlflowClient(base)
    runs = [client.get_run(run_id) for run_id in run_ids]
    names = {run.info.run_name for run in runs}
    assert names == set(VARIANTS), f"parent runs are named by variant: {names}"
    shown = {  # every finite test_*_mean of every parent, as the UI prints it
        ui_metric(value)
        for run in runs
        for key, value in run.data.metrics.items()
        if key.startswith("test_") and key.endswith("_mean") and math.isfinite(value)
    }
    assert shown, "the parent runs logged no test_*_mean metric"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow-compare.png"
    shot.unlink(missing_ok=True)
    home = tmp_path / "home"  # whatever Chromium writes outside its (temporary) profile lands here
    env: dict[str, str | float | bool] = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(  # a fresh temporary profile per launch
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            downloads_path=tmp_path / "downloads",
            timeout=startup_timeout() * 1000,  # Chromium's start-up, on a loaded machine
        )
        try:
            context = browser.new_context(viewport={"width": 1800, "height": 1000})
            context.add_init_script(NO_ASSISTANT)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(compare_url(base, run_ids, [experiment_id]))

            body = page.locator("body")
            expect(body).to_contain_text(f"Comparing {len(parents)} Runs", timeout=TIMEOUT_MS)
            for metric in METRIC_NAMES:  # the metrics table has rendered its names ...
                expect(body).to_contain_text(metric, timeout=TIMEOUT_MS)
            for value in sorted(shown):  # ... and its values
                expect(body).to_contain_text(value, timeout=TIMEOUT_MS)

            assert row_cells(page, "Run ID:") == run_ids
            assert row_cells(page, "Run Name:") == list(VARIANTS)

            full_page_screenshot(page, shot)
        finally:
            browser.close()

    assert shot.is_file(), shot
    assert shot.stat().st_size > 10_000, f"{shot}: {shot.stat().st_size} bytes, suspiciously small"


@contextlib.contextmanager
def browser_page(tmp_path: Path) -> Iterator[Page]:
    """A page of a fresh headless Chromium (a new profile: the UI's first-visit defaults)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's browser (apt-get install -y chromium)")
    home = tmp_path / "home"
    env: dict[str, str | float | bool] = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            downloads_path=tmp_path / "downloads",
            timeout=startup_timeout() * 1000,
        )
        try:
            context = browser.new_context(viewport={"width": 1800, "height": 1000})
            context.add_init_script(NO_ASSISTANT)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def printed_url(mlflow_url: str, experiment: str, run_root: Path) -> str:
    """The link the suite prints for a tracking server (`open URL`), made by the same code."""
    from tracking.store import Tracker

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_url
    try:
        command = Tracker(experiment, run_root).ui_command()
    finally:
        if saved is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    assert command.startswith("open "), command
    return command.removeprefix("open ")


@pytest.mark.integration
def test_the_printed_link_opens_the_runs_table(stack_suite: dict[str, Any], tmp_path: Path) -> None:
    """Not MLflow 3.17's GenAI overview (traces, usage, tool calls): the variants' runs."""
    experiment_id = str(stack_suite["experiment_id"])
    url = printed_url(stack_suite["mlflow"], STACK_SUITE, tmp_path / "runs")
    assert f"#/experiments/{experiment_id}" in url, url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow-runs-table.png"
    shot.unlink(missing_ok=True)
    with browser_page(tmp_path) as page:
        page.goto(url)
        body = page.locator("body")
        # the runs table's own header, and the parent runs in it by name
        expect(page.get_by_role("columnheader", name="Run Name").first).to_be_visible(
            timeout=TIMEOUT_MS
        )
        for variant in VARIANTS:
            expect(page.get_by_role("link", name=variant, exact=True).first).to_be_visible(
                timeout=TIMEOUT_MS
            )
        expect(page.get_by_role("link", name="summary", exact=True).first).to_be_visible(
            timeout=TIMEOUT_MS
        )
        for genai in ("Tool calls", "Token Usage"):  # the GenAI overview's panels
            expect(body).not_to_contain_text(genai, timeout=TIMEOUT_MS)
        page.screenshot(path=str(shot), animations="disabled")
    assert shot.stat().st_size > 10_000, f"{shot}: suspiciously small"


@pytest.mark.integration
def test_the_model_version_page_shows_its_signature(
    stack_suite: dict[str, Any], tmp_path: Path
) -> None:
    client = MlflowClient(stack_suite["mlflow"])
    version = client.get_model_version_by_alias("agegender-multitask", "champion")
    assert version.description, "the champion version has no description"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow-model-version.png"
    shot.unlink(missing_ok=True)
    base = str(stack_suite["mlflow"]).rstrip("/")
    with browser_page(tmp_path) as page:
        page.goto(f"{base}/#/models/agegender-multitask/versions/{version.version}")
        body = page.locator("body")
        expect(body).to_contain_text(f"Version {version.version}", timeout=TIMEOUT_MS)
        # the description, rendered as markdown (no backticks), and the logged model it is
        shown = version.description.split(":")[0].replace("`", "")  # "Suite S, variant V, ..."
        expect(body).to_contain_text(shown, timeout=TIMEOUT_MS)
        expect(body).to_contain_text("Source Model:", timeout=TIMEOUT_MS)
        inputs = page.get_by_text("Inputs (2)", exact=True)
        inputs.click()
        table = page.locator("table, [role=table]").filter(has_text="Inputs (2)").first
        expect(table).to_contain_text("image", timeout=TIMEOUT_MS)
        expect(table).to_contain_text("detect", timeout=TIMEOUT_MS)
        page.get_by_text("Outputs (", exact=False).first.click()
        expect(table).to_contain_text("age_probs", timeout=TIMEOUT_MS)
        full_page_screenshot(page, shot)
    assert shot.stat().st_size > 10_000, f"{shot}: suspiciously small"
