# TEST STAND-IN for `postgres:16` (Docker Hub is not reachable in CI): Debian bookworm's
# PostgreSQL 15 with the few parts of the official image's entrypoint that compose.yaml uses
# (POSTGRES_USER/PASSWORD/DB, *.sql in /docker-entrypoint-initdb.d, data in
# /var/lib/postgresql/data). Built by tests/containers.py and tagged `postgres:16` on the test's
# private engine only; never used by users' compose. Base: the Debian-made stand-in of
# python:3.11-slim-bookworm (tests/containers.py).
FROM agegender-standin/base:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /docker-entrypoint-initdb.d /var/lib/postgresql/data \
    && chown postgres:postgres /var/lib/postgresql/data \
    && install -d -o postgres -g postgres /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
