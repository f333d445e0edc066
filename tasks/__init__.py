"""Prefect tasks: thin wrappers that call `agegender` and log to MLflow (suite issue)."""
