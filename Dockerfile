# syntax=docker/dockerfile:1
# imgproxy as one .pyz (shiv) on python:3.11-slim, pre-extracted at build time.
#
#   docker build -t imgproxy .
#   docker run --rm -p 8000:8000 -v ./data/images:/app/data:ro imgproxy
#
# Runs as uid 10001 under tini and works with a read-only root filesystem as long as /tmp
# (PROMETHEUS_MULTIPROC_DIR) is writable (tmpfs) and, with the disk cache on,
# /var/cache/imgproxy (a volume). The .pyz must be built and run by the same CPython minor,
# hence the same base image for both stages.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY build/shiv.sh build/requirements.lock ./build/
# shebang = the runtime image's interpreter, not whatever python3 is first on PATH
RUN PYTHON=/usr/local/bin/python3.11 PYZ_PYTHON=/usr/local/bin/python3.11 \
    bash build/shiv.sh /src/imgproxy.pyz

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 imgproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin imgproxy \
    && mkdir -p /app/data /var/cache/imgproxy \
    && chown 10001:10001 /var/cache/imgproxy

ENV SHIV_ROOT=/opt/shiv \
    IMAGE_PROXY_ROOT_PATH=/app/data \
    IMAGE_PROXY_CACHE_DISK_PATH=/var/cache/imgproxy \
    PROMETHEUS_MULTIPROC_DIR=/tmp/imgproxy-metrics \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1

# keep the file name: it is part of the extraction path under SHIV_ROOT
COPY --from=build /src/imgproxy.pyz /app/imgproxy.pyz
# extract (with .pyc) into /opt/shiv now, as root: read-only at run time, fast start
RUN SHIV_INTERPRETER=1 SHIV_COMPILE_PYC=1 /app/imgproxy.pyz -c "import imgproxy" \
    && /app/imgproxy.pyz --version

USER 10001:10001
WORKDIR /app
EXPOSE 8000
VOLUME ["/var/cache/imgproxy"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/python3.11", "-c", "import os, sys, urllib.request; port = os.environ.get('IMAGE_PROXY_BIND_ADDRESS', ':8000').rpartition(':')[2]; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status != 200)"]
# exec form: SIGTERM reaches tini, which forwards it to Sanic's main process (in its own
# process group: Sanic may SIGKILL that group) and reaps zombies
ENTRYPOINT ["/usr/bin/tini", "--", "/app/imgproxy.pyz"]
