# syntax=docker/dockerfile:1
# The MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3 (SeaweedFS), its
# basic-auth app (the `auth` extra: Flask-WTF).
# The server's settings (stores, hosts, workers) come from compose.yaml's `command`; this image
# also runs the one-shot `s3-init` service (it has boto3) and the front doors on $LISTEN
# (compose's `*-door` services: deployments/relay.py, standard library only).
# Built from the repository root; mlflow.Dockerfile.dockerignore sends relay.py alone:
#   docker build -f docker/mlflow.Dockerfile -t agegender-mlflow:latest .
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG BOTO3_VERSION=1.44.8
ARG PSYCOPG2_VERSION=2.9.13

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "boto3==${BOTO3_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
    && useradd --uid 10002 --user-group --create-home --home-dir /home/mlflow \
        --shell /usr/sbin/nologin mlflow

# the front doors' relay, run as a script: `python /opt/agegender/relay.py SERVICE ...`
COPY deployments/relay.py /opt/agegender/relay.py

USER 10002:10002
WORKDIR /home/mlflow

EXPOSE 5000

HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=8)"]

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
