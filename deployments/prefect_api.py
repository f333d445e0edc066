"""One Prefect REST client for the ops room (the stack, its work pools, schedules and
automations): stdlib only, its endpoint and credentials given, never read from anywhere."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from deployments.services import PREFECT_AUTH_VAR, StackError, basic_auth


@dataclass(frozen=True)
class PrefectApi:
    base: str  # the server's API URL, ".../api"
    auth: str | None = None  # Prefect's "user:password"; a server without auth ignores it

    def __call__(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        """One REST call; `missing_ok`: None for a 404 instead of an error."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers |= basic_auth(self.auth)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            if exc.code == 401:
                fix = "is wrong" if self.auth else "is not set"
                raise StackError(
                    f"Prefect API at {self.base} asks for credentials (HTTP 401) and "
                    f"{PREFECT_AUTH_VAR} {fix}; set it (environment or .env) to the server's "
                    "user:password"
                ) from None
            raise StackError(
                f"Prefect API at {self.base}: {method} {path} failed ({exc})"
            ) from None
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise StackError(
                f"Prefect API at {self.base}: {method} {path} failed ({exc})"
            ) from None
