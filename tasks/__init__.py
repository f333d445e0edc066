"""Prefect tasks: thin wrappers that call `agegender` and log to MLflow (`tasks.tracking`).

Importing this package sets the client defaults the user did not set (telemetry off, a generous
start-up time for Prefect's ephemeral server: `deployments.services.DEFAULTS`): it runs before
Prefect or MLflow are imported by the tasks and flows (Prefect reads its settings once, at
import).
"""

from deployments.services import apply_defaults

apply_defaults()


class TrackingError(RuntimeError):
    """The tracking server (or store) refused or failed a request, after retries.

    Here and not in `tasks.tracking`, so the CLI can catch it without importing MLflow.
    """


class StartupError(RuntimeError):
    """A server this run needs did not start; the message names it and the setting to raise."""
