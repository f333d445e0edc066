"""Prefect flows composed from `tasks` (filled by the suite issue)."""
