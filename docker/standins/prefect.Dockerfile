# TEST STAND-IN for `prefecthq/prefect:<version>-python3.11` (Docker Hub is not reachable in CI):
# Prefect from PyPI in a venv on PATH, as in the official image. Built by tests/containers.py;
# never used by users' compose.
FROM agegender-standin/base:bookworm
ARG PREFECT_VERSION=3.9.1
ENV PATH=/opt/prefect/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/prefect \
    && pip install --no-cache-dir "prefect==${PREFECT_VERSION}" \
    && prefect version
EXPOSE 4200
CMD ["prefect", "server", "start", "--host", "0.0.0.0"]
