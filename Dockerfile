# The project image: Flower, PyTorch and this package. In the compose demo it runs the ServerApp
# and the ClientApps (flower-superexec) beside Flower's official SuperLink and SuperNode images,
# registers SuperNode keys, launches runs (the `flwr` CLI) and runs the Fleet API proxy (Debian's
# nginx, deploy/fleet-proxy.sh; a base image without apt access must carry nginx already).
#
#   docker build -t layercam-ae-fl:latest .
#
# Wheels placed in docker/wheels/ (e.g. `pip download . -d docker/wheels`) are used first; with
# --build-arg PIP_OFFLINE=1 they are the only source, so the image builds without a package index.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_OFFLINE=

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
RUN python3 -m venv /opt/venv
RUN command -v nginx || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*; }

COPY docker/wheels/ /tmp/wheels/
RUN pip install ${PIP_OFFLINE:+--no-index} --find-links /tmp/wheels "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY task/ task/
COPY strategies/ strategies/
COPY attacks/ attacks/
COPY crypto/ crypto/
COPY server_app/ server_app/
COPY client_app/ client_app/
COPY experiments/ experiments/
COPY deploy/*.sh deploy/fleet-proxy.conf.template deploy/
RUN pip install ${PIP_OFFLINE:+--no-index} --find-links /tmp/wheels /app && rm -rf /tmp/wheels
WORKDIR /work
