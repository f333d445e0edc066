"""Prefect tasks: thin wrappers that call `agegender` and log to MLflow (`tracking`).

Importing this package sets the client defaults the user did not set (telemetry off, a generous
start-up time for Prefect's ephemeral server: `deployments.services.DEFAULTS`): it runs before
Prefect or MLflow are imported by the tasks and flows (Prefect reads its settings once, at
import).
"""

from deployments.services import apply_defaults

apply_defaults()
