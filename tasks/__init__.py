"""Prefect tasks: thin wrappers that call `agegender` and log to MLflow (`tracking`).

Importing this package sets defaults the user did not set: it runs before Prefect or MLflow are
imported by the tasks and flows (Prefect reads its settings once, at import). Telemetry is off,
and Prefect's ephemeral API server gets `EPHEMERAL_STARTUP_S` to start instead of Prefect's 20 s,
which a busy 2-core machine exceeds (the first command then died of a timeout).
"""

import os

EPHEMERAL_STARTUP_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_S = 600

for _var, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    EPHEMERAL_STARTUP_VAR: str(EPHEMERAL_STARTUP_S),
}.items():
    os.environ.setdefault(_var, _value)


class StartupError(RuntimeError):
    """A server this run needs did not start; the message names it and the setting to raise."""
