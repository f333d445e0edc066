"""The MLflow users of an authenticated stack, made through the basic-auth app's REST API as its
admin: `worker` (creates and edits every experiment, run and registered model: the workers and
the CLI write as it) and `reader` (reads everything, writes nothing: for the UI).

The server runs with workspaces on and `default_permission = READ`: a user may create
experiments only with a workspace grant of USE, which the worker's role has and the reader
lacks. Passwords are set again on every run (`.env` may have changed them); the admin's cannot
be: MLflow takes it only when it creates the admin.

Standard library only and importing nothing of ours: `agegender stack up` calls `ensure_users`,
and compose's one-shot `mlflow-users` runs this file in the MLflow image:

    MLFLOW_TRACKING_URI=... MLFLOW_AUTH_ADMIN_PASSWORD=... AGEGENDER_MLFLOW_WORKER_PASSWORD=...
    AGEGENDER_MLFLOW_READER_PASSWORD=... python mlflow_users.py
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

WRITER_ROLE = "agegender-writer"  # the worker's role: create and edit everything
WRITER_GRANTS = (("workspace", "USE"), ("experiment", "EDIT"), ("registered_model", "EDIT"))
WORKSPACE = "default"


class UsersError(RuntimeError):
    """A refused or failed call; the message names the server and what to do."""


class MlflowAdmin:
    """MLflow's auth REST API, as its admin."""

    def __init__(self, url: str, admin: tuple[str, str]) -> None:
        self.url, self.admin = url.rstrip("/"), admin

    def call(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        token = base64.b64encode(":".join(self.admin).encode()).decode()
        headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            said = exc.read().decode(errors="replace")[:300]
            raise UsersError(
                f"MLflow at {self.url}: {method} {path} failed ({exc}): {said}"
            ) from None
        except (OSError, ValueError) as exc:
            raise UsersError(f"MLflow at {self.url}: {method} {path} failed ({exc})") from None

    def check_admin(self) -> None:
        """The admin logs in; a 401 means the admin exists with another password."""
        try:
            self.call("GET", "/api/2.0/mlflow/users/get?" + _query(username=self.admin[0]))
        except UsersError as exc:
            if "401" not in str(exc):
                raise
            raise UsersError(
                f"MLflow at {self.url} refused the admin {self.admin[0]!r} with "
                "MLFLOW_AUTH_ADMIN_PASSWORD: MLflow sets the admin's password only when it creates "
                "the admin (its first start on this database); set the password it was created "
                "with, or change it through MLflow's API as the admin (PATCH "
                "/api/2.0/mlflow/users/update-password with the old one)"
            ) from None


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params)


def ensure_users(
    url: str, admin: tuple[str, str], worker: tuple[str, str], reader: tuple[str, str]
) -> str:
    """Make (or update) the worker and reader and the worker's role; returns what was done."""
    api = MlflowAdmin(url, admin)
    api.check_admin()
    for name, password in (worker, reader):
        body = {"username": name, "password": password}
        if api.call("GET", "/api/2.0/mlflow/users/get?" + _query(username=name), missing_ok=True):
            api.call("PATCH", "/api/2.0/mlflow/users/update-password", body)
        else:
            api.call("POST", "/api/2.0/mlflow/users/create", body)
    roles = api.call("GET", "/api/3.0/mlflow/roles/list?" + _query(workspace=WORKSPACE))["roles"]
    role = next((r for r in roles if r["name"] == WRITER_ROLE), None)
    if role is None:
        body = {"name": WRITER_ROLE, "workspace": WORKSPACE, "description": "agegender workers"}
        role = api.call("POST", "/api/3.0/mlflow/roles/create", body)["role"]
    have = {(p["resource_type"], p["permission"]) for p in role.get("permissions", [])}
    for kind, level in WRITER_GRANTS:
        if (kind, level) not in have:
            grant = {"resource_type": kind, "resource_pattern": "*", "permission": level}
            api.call(
                "POST", "/api/3.0/mlflow/roles/permissions/add", {"role_id": role["id"]} | grant
            )
    assigned = api.call("GET", "/api/3.0/mlflow/users/roles/list?" + _query(username=worker[0]))
    if not any(r["id"] == role["id"] for r in assigned.get("roles", [])):
        api.call(
            "POST", "/api/3.0/mlflow/roles/assign", {"username": worker[0], "role_id": role["id"]}
        )
    return f"MLflow users: {admin[0]} (admin), {worker[0]} (writes runs), {reader[0]} (reads only)"


def main() -> None:
    env = os.environ
    missing = [
        k
        for k in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "AGEGENDER_MLFLOW_WORKER_PASSWORD",
            "AGEGENDER_MLFLOW_READER_PASSWORD",
        )
        if not env.get(k)
    ]
    if missing:
        sys.exit(f"error: mlflow users: {', '.join(missing)} not set")
    try:
        done = ensure_users(
            env["MLFLOW_TRACKING_URI"],
            (env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin", env["MLFLOW_AUTH_ADMIN_PASSWORD"]),
            (
                env.get("AGEGENDER_MLFLOW_WORKER_USER") or "worker",
                env["AGEGENDER_MLFLOW_WORKER_PASSWORD"],
            ),
            (
                env.get("AGEGENDER_MLFLOW_READER_USER") or "reader",
                env["AGEGENDER_MLFLOW_READER_PASSWORD"],
            ),
        )
    except UsersError as exc:
        sys.exit(f"error: {exc}")
    print(done)


if __name__ == "__main__":
    main()
