"""Flow parameters as deployments send them (JSON) are validated by Prefect against the flows'
typed signatures before a run starts: a mismatch fails a scheduled or scale-out run on the
server, minutes in. Checked here without a server."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from agegender.config import Config
from flows.settings import SuiteRun
from tests.conftest import REPO, scale_out_params


def _flow(entrypoint: str) -> Any:
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_deployments_parameters_fit_its_flow() -> None:
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        flow = _flow(d["entrypoint"])
        params = d.get("parameters") or {}
        if d["entrypoint"].endswith(":train_fold_flow"):  # the suite adds the job
            params = params | {"job": _job()}
        flow.validate_parameters(params)  # raises on a mismatch


def _job() -> dict[str, Any]:
    return {
        "cache_dir": "/c",
        "fold": 0,
        "variant": "age",
        "config": Config().model_dump(mode="json"),
        "run_root": "/r",
        "suite": "s",
        "parent_id": "p",
    }


def test_suite_and_config_sections_arrive_as_typed_objects() -> None:
    from flows.suite import cross_validate, suite_flow

    suite = {"mode": "deployments", "pretrain": {"root": "/data/celeba"}}
    got = suite_flow.validate_parameters({"suite": suite, "config": {"preset": "modern"}})
    assert isinstance(got["suite"], SuiteRun)
    assert got["suite"].mode == "deployments"
    assert got["config"] == Config.model_validate({"preset": "modern"})
    # a suite section without variants, as the scale-out test sends it: the default variants
    # would want a backbone, so cross_validate validates it with its own variant
    cross_validate.validate_parameters(scale_out_params("x", Path("/cache"), Path("/runs")))
    with pytest.raises(Exception, match="mode"):
        suite_flow.validate_parameters({"suite": {"mode": "everywhere"}})
