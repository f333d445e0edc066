# syntax=docker/dockerfile:1
# The GPU worker image: the agegender project on CUDA PyTorch. Run as the compose `worker` service
# it is a Prefect *docker* worker on the docker work pool `gpu`, which starts each flow run in a
# new container of this same image (with the GPUs, /data and /runs; see docker/README.md).
# Built from the repository root:
#   docker build -f docker/worker.Dockerfile -t agegender-worker:latest .
# Only the files listed in worker.Dockerfile.dockerignore are sent to the builder.
FROM python:3.11-slim-bookworm

# The tested versions; the Prefect and MLflow clients match the servers in compose.yaml.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PREFECT_VERSION=3.9.1
ARG PREFECT_DOCKER_VERSION=0.7.4
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    AGEGENDER_HOME=/app

# torch.compile's Triton kernels (the fused training step, `train.step`) are launched through a
# small C module that Triton builds on first use with the system's C compiler; slim has none.
# Not pinned: bookworm's point releases replace libc6-dev, and a pinned version then vanishes
# from the archive; the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The PyPI torch wheels for Linux are CUDA builds that bring their CUDA libraries as wheels; the
# driver comes from the host through the NVIDIA container toolkit. Their own layer: it is large
# (about 5.8 GB). A CPU-only image, for hosts without a GPU (docker/README.md, "Images"):
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=""
RUN python -m venv /opt/venv \
    && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/agegender \
        --shell /usr/sbin/nologin agegender \
    && mkdir -p /app /data /runs \
    && chown agegender:agegender /runs

WORKDIR /app

# The project's requirements, read from pyproject.toml, in a layer that code changes keep.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); open('/tmp/requirements.txt', 'w').write('\n'.join(p['project']['dependencies']))" \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
        "prefect==${PREFECT_VERSION}" "prefect-docker==${PREFECT_DOCKER_VERSION}" \
        "mlflow==${MLFLOW_VERSION}" \
    && rm /tmp/requirements.txt

# The code: installed (the `agegender` command) and kept in /app, the working directory of the
# flow-run containers, where flow entrypoints such as flows/fold.py:train_fold_flow are found.
COPY README.md ./
COPY agegender/ agegender/
COPY tracking/ tracking/
COPY serving/ serving/
COPY tasks/ tasks/
COPY flows/ flows/
COPY deployments/ deployments/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && agegender --help > /dev/null

USER 10001:10001

# Datasets are mounted read-only at /data, run roots (checkpoints, caches) live in /runs.
VOLUME ["/runs"]

# `--with-healthcheck` serves /health on PREFECT_WORKER_WEBSERVER_PORT (8080): 200 while polling.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=8)"]

# The worker needs the host's Docker socket (compose mounts it); flow-run containers get their
# own command from the docker worker.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "docker", "--with-healthcheck"]
