"""Prefect flows composed from `tasks`, and the `agegender` command line."""

from deployments.services import apply_defaults

apply_defaults()  # telemetry off, Prefect's start-up time: before anything imports Prefect
