"""Prefect tasks: thin wrappers that call `agegender` and log to MLflow (`tasks.tracking`).

Importing this package switches telemetry off unless the user set it: it runs before Prefect or
MLflow are imported by the tasks and flows.
"""

import os

for _var, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}.items():
    os.environ.setdefault(_var, _value)


class TrackingError(RuntimeError):
    """The tracking server (or store) refused or failed a request, after retries.

    Here and not in `tasks.tracking`, so the CLI can catch it without importing MLflow.
    """
