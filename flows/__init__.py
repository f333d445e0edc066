"""Prefect flows composed from `tasks`, and the `agegender` command line."""

import tasks  # noqa: F401  (telemetry defaults, before Prefect is imported)
