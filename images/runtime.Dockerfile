# The runtime image: `modelloader gateway`, and the Ray head and worker pods that host the
# LiteRT workers (KubeRay runs `ray start` in it). libvulkan1: LiteRT's GPU path is WebGPU over
# Vulkan (the NVIDIA container runtime mounts the driver's ICD); wget: KubeRay's probes.
# Build from the repository root:
#   docker build -f images/runtime.Dockerfile -t ghcr.io/modelloader/runtime:0.1.0 .
# The base is pinned to an exact Python and Debian release; pin its digest too in your registry
# mirror (--build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY workers ./workers
# This repository's package and its pinned dependencies, as wheels.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini wget libvulkan1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 modelloader \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin modelloader
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels modelloader \
    && rm -rf /wheels
COPY images/entrypoint.sh /usr/local/bin/modelloader-entrypoint
# Runs with a read-only root filesystem: /tmp (HOME, Ray's session folder) is a volume.
ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/modelloader-entrypoint"]
