# syntax=docker/dockerfile:1
#
# The forwarder as a container: `docker build -t forwarder .` at the repository root,
# or `docker compose -f deploy/docker-compose.yml up -d` (see deploy/).
#
# builder: wheels of the project and its runtime dependencies (no dev extras).
# final:   python:3.11-slim + those wheels, installed offline; no compiler, no pip cache,
#          no source tree. Runs as uid 10001, works with a read-only root filesystem:
#          it writes only to the data volume (/var/lib/forwarder) and /tmp.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md: pyproject.toml names it as the package's long description.
COPY pyproject.toml README.md ./
COPY forwarder ./forwarder
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="forwarder" \
      org.opencontainers.image.description="Tails logs, normalizes them to one schema, writes them to PostgreSQL exactly once."

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the wheels, installed offline from the builder's folder (bind-mounted, so they
# leave no layer behind). pip compiles the .pyc files now, while the filesystem is
# writable; at run time nothing is compiled or written (PYTHONDONTWRITEBYTECODE).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl \
    && forwarder --version

# A fixed uid/gid (10001), so the owner of the data volume is known in advance. The
# data folder is group 0 and group-writable, so a deployment that must run the
# container as root to read dockerd's log files (deploy/docker-compose.yml) can write
# there with every capability dropped.
RUN groupadd --system --gid 10001 forwarder \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/forwarder --shell /usr/sbin/nologin forwarder \
    && mkdir -p /var/lib/forwarder /etc/forwarder \
    && chown 10001:0 /var/lib/forwarder \
    && chmod 2770 /var/lib/forwarder

COPY config/forwarder.toml /etc/forwarder/forwarder.toml

# The config file; every key can still be overridden as FORWARDER_<SECTION>__<KEY>.
# database.dsn stays empty in the file: set FORWARDER_DATABASE__DSN when running.
# The HTTP server (/health, /metrics, POST /logs/ingest) listens on every interface
# inside the container; publish the port only where it is meant to be reached.
ENV FORWARDER_CONFIG=/etc/forwarder/forwarder.toml \
    FORWARDER_HTTP__ENABLED=true \
    FORWARDER_HTTP__LISTEN=0.0.0.0:8686

# database.data_dir of config/forwarder.toml: spools, the generated privacy key.
VOLUME ["/var/lib/forwarder"]
WORKDIR /var/lib/forwarder
USER 10001:10001
EXPOSE 8686

# /health answers 200 when every component is ok, 503 otherwise; urlopen raises on
# anything but 2xx/3xx. The port is taken from FORWARDER_HTTP__LISTEN.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('FORWARDER_HTTP__LISTEN', '127.0.0.1:8686').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4); sys.exit(0)"]

# SIGTERM drains: sources stop, the last batch commits, exit 0 (daemon.drain_timeout_s
# is 30 s by default: give `docker stop` a longer --time / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["forwarder"]
CMD ["run"]
