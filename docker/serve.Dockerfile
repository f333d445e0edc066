# syntax=docker/dockerfile:1
# The serving image: `agegender serve` (one uvicorn worker, cross-request batching, limits,
# /ping, /model, /metrics) answering MLflow's scoring protocol on port 5001. Run as the compose
# `serve` service (profile `serve`) it serves models:/agegender-multitask@champion from the
# compose MLflow; see docker/README.md. Built from the repository root:
#   docker build -f docker/serve.Dockerfile -t agegender-serve:latest .
# Its instructions up to the code are the worker image's, word for word, so that the builder
# reuses the worker's layers (torch, the requirements) instead of storing them twice. Only the
# files listed in serve.Dockerfile.dockerignore are sent to the builder.
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

# The code: installed (the `agegender` command). No tasks/ or flows/ runs here, but flows/cli.py
# holds the `agegender` command and imports them.
COPY README.md ./
COPY agegender/ agegender/
COPY tracking/ tracking/
COPY serving/ serving/
COPY tasks/ tasks/
COPY flows/ flows/
COPY deployments/ deployments/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && agegender serve --help > /dev/null

USER 10001:10001

# /app is root's: the server runs in its user's home, where the run root it makes (`runs/suite`,
# unused with an MLflow server) can be written; the model's download goes to /tmp.
WORKDIR /home/agegender

EXPOSE 5001

# torch's idle OpenMP threads sleep instead of spinning, leaving the cores to the decode threads
# (top-level README, "Workers, time-outs, limits")
ENV OMP_WAIT_POLICY=PASSIVE

# /ping answers 200 once the model is loaded and one warm-up prediction ran. The credentials
# come from the environment (AGEGENDER_SERVE_AUTH, user:password), never the command line.
HEALTHCHECK --interval=10s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import base64, os, urllib.request as u; auth = base64.b64encode(os.environ.get('AGEGENDER_SERVE_AUTH', '').encode()).decode(); u.urlopen(u.Request('http://127.0.0.1:5001/ping', headers={'Authorization': 'Basic ' + auth}), timeout=8)"]

# Beyond the container's loopback: `agegender serve` refuses to start without AGEGENDER_SERVE_AUTH.
CMD ["agegender", "serve", "--model", "models:/agegender-multitask@champion", "--host", "0.0.0.0", "--port", "5001"]
