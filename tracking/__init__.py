"""The MLflow boundary: every MLflow call (`tracking.store`), every tag a run carries
(`tracking.schema`) and the served model (`tracking.serving`) live in this package.

Callers get the project's own small records (`tracking.schema.RunRecord`), never MLflow objects.
This module imports no MLflow, so the CLI can catch `TrackingError` without loading it.
"""


class TrackingError(RuntimeError):
    """The tracking server (or store) refused or failed a request, after retries."""
