"""Who may call the stack's servers, and the secrets it keeps: read from the environment, else
`.env`, never a default password; a command reads them once and passes them on.

Prefect's client setting (the server gets the same string as PREFECT_SERVER_API_AUTH_STRING) and
MLflow's own basic-auth bootstrap variables; two more MLflow users that the stack makes through
its REST API. S3's credentials are the server's admin identity and every client's signature.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from deployments.services import (
    MLFLOW_PASSWORD_VAR,
    MLFLOW_USER_VAR,
    PREFECT_AUTH_VAR,
    REPO,
    StackError,
)

ENV_FILE = REPO / ".env"

MLFLOW_ADMIN_USER_VAR = "MLFLOW_AUTH_ADMIN_USERNAME"  # default "admin"
MLFLOW_ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_PASSWORD"
WORKER_USER_VAR = "AGEGENDER_MLFLOW_WORKER_USER"  # default "worker": writes runs and models
WORKER_PASSWORD_VAR = "AGEGENDER_MLFLOW_WORKER_PASSWORD"
READER_USER_VAR = "AGEGENDER_MLFLOW_READER_USER"  # default "reader": reads, writes nothing
READER_PASSWORD_VAR = "AGEGENDER_MLFLOW_READER_PASSWORD"
AUTH_SECRET_VARS = (
    PREFECT_AUTH_VAR,
    MLFLOW_ADMIN_PASSWORD_VAR,
    WORKER_PASSWORD_VAR,
    READER_PASSWORD_VAR,
)
AUTH_VARS = (*AUTH_SECRET_VARS, MLFLOW_ADMIN_USER_VAR, WORKER_USER_VAR, READER_USER_VAR)
MIN_PASSWORD = 12  # MLflow's own rule for its users' passwords; Prefect's password too
S3_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# never passed on to a service that does not need it (each gets its own: `deployments.commands`)
SECRETS = (
    *AUTH_VARS,
    MLFLOW_USER_VAR,
    MLFLOW_PASSWORD_VAR,
    "PREFECT_SERVER_API_AUTH_STRING",
)


@dataclass(frozen=True)
class Auth:
    """Who may call the servers: Prefect's "user:password" and MLflow's three users (name,
    password). Read by `auth_settings`, never stored by the stack."""

    prefect: str
    admin: tuple[str, str]
    worker: tuple[str, str]
    reader: tuple[str, str]


def private_env_file(env_file: Path) -> None:
    """A `.env` that other users may read (`cp .env.example .env` leaves it 0644) is made 0600
    before it is read, with one note on stderr; one we cannot change is an error."""
    mode = env_file.stat().st_mode & 0o777
    if not mode & 0o077:
        return
    try:
        os.chmod(env_file, 0o600)
    except OSError as exc:
        raise StackError(
            f"{env_file} holds secrets and is open to other users (mode {mode:04o}), and it "
            f"is not ours to change ({exc.strerror}); run `chmod 600 {env_file}` as its owner"
        ) from None
    print(
        f"note: {env_file} was open to other users (mode {mode:04o}); made it private "
        f"(`chmod 600 {env_file}`)",
        file=sys.stderr,
    )


def env_values(keys: tuple[str, ...], env_file: Path = ENV_FILE) -> dict[str, str]:
    """Each of `keys` set (not empty) in the environment, else in `.env` (KEY=VALUE lines)."""
    values = {k: os.environ[k] for k in keys if os.environ.get(k)}
    if len(values) < len(keys) and env_file.is_file():
        private_env_file(env_file)
        for line in env_file.read_text().splitlines():
            key, sep, value = line.strip().removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip().strip("'\"")
            if sep and key in keys and key not in values and value:
                values[key] = value
    return values


def origin(key: str, env_file: Path = ENV_FILE) -> str:
    """Where `env_values` took `key` from, for an error that says what to change."""
    return "the environment" if os.environ.get(key) else str(env_file)


def prefect_auth(env_file: Path = ENV_FILE) -> str | None:
    """Prefect's auth string alone, where a caller needs no more (a health check, any server)."""
    return env_values((PREFECT_AUTH_VAR,), env_file).get(PREFECT_AUTH_VAR)


def auth_configured(env_file: Path = ENV_FILE) -> bool:
    """Any of the servers' passwords set: `stack up` then turns authentication on."""
    return bool(env_values(AUTH_SECRET_VARS, env_file))


def auth_settings(env_file: Path = ENV_FILE) -> Auth:
    """The servers' credentials from the environment, else `.env`; never defaults for the
    passwords. Missing or unusable ones are one error naming each variable."""
    values = env_values(AUTH_VARS, env_file)
    problems = [f"{k} is not set" for k in AUTH_SECRET_VARS if k not in values]
    prefect = values.get(PREFECT_AUTH_VAR, "")
    user, _, password = prefect.partition(":")
    if prefect and not (user and password):
        problems.append(f"{PREFECT_AUTH_VAR} must be user:password")
    elif prefect and len(password) < MIN_PASSWORD:
        problems.append(
            f"{PREFECT_AUTH_VAR}'s password is shorter than {MIN_PASSWORD} characters (set in "
            f"{origin(PREFECT_AUTH_VAR, env_file)})"
        )
    names = {
        "admin": (values.get(MLFLOW_ADMIN_USER_VAR, "admin"), MLFLOW_ADMIN_PASSWORD_VAR),
        "worker": (values.get(WORKER_USER_VAR, "worker"), WORKER_PASSWORD_VAR),
        "reader": (values.get(READER_USER_VAR, "reader"), READER_PASSWORD_VAR),
    }
    for _name, var in names.values():
        if var in values and len(values[var]) < MIN_PASSWORD:
            problems.append(
                f"{var} is shorter than {MIN_PASSWORD} characters (MLflow's rule; set in "
                f"{origin(var, env_file)})"
            )
    if len({n for n, _ in names.values()}) < len(names):
        problems.append(
            f"{MLFLOW_ADMIN_USER_VAR}, {WORKER_USER_VAR} and {READER_USER_VAR} must differ"
        )
    if problems:
        raise StackError(
            "authentication: " + "; ".join(problems) + " (set them in the environment or in "
            f"{env_file}; see .env.example)"
        )
    pair = {who: (n, values[var]) for who, (n, var) in names.items()}
    return Auth(prefect, pair["admin"], pair["worker"], pair["reader"])


def credentials(env_file: Path = ENV_FILE) -> dict[str, str]:
    """S3 credentials from the environment, else from `.env` (KEY=VALUE lines); never defaults."""
    values = env_values(S3_VARS, env_file)
    missing = [k for k in S3_VARS if not values.get(k)]
    if missing:
        raise StackError(
            f"S3 credentials: {' and '.join(missing)} not set; put them in the environment or in "
            f"{env_file} (see .env.example); the S3 server never runs anonymously"
        )
    return values


def own_secret(path: Path) -> str:
    """A random secret of the stack's own (made once, kept in the run dir with mode 0600)."""
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    return path.read_text().strip()
