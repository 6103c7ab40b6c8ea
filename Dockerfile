# visionrpc serving image. GPU (default): onnxruntime-gpu on a CUDA 13 + cuDNN 9 runtime base.
#   docker build -t visionrpc:gpu .
# CPU: the slim Python base with the CPU-only onnxruntime.
#   docker build --build-arg BASE_IMAGE=python:3.11-slim --build-arg VARIANT=cpu -t visionrpc:cpu .
# Training image (torch, torchvision, onnx): add --target train.
# A network that re-signs TLS can hand pip its CA bundle without baking it into a layer:
#   --secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python
# CUDA runtime images carry no Python; python:*-slim ones do. Builder and runtime stages both
# start here, so the venv's interpreter path is the same in both.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

FROM python AS dependencies
ARG VARIANT=gpu
WORKDIR /src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Only what lists the dependencies: this layer (340 MB of onnxruntime-gpu in the GPU image)
# is rebuilt when pyproject.toml changes, not on every edit to the code.
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && case "${VARIANT}" in \
         gpu) extra=server ;; \
         cpu) extra=server-cpu ;; \
         *) echo "VARIANT must be gpu or cpu, not ${VARIANT}" >&2; exit 1 ;; \
       esac \
    && python3 -m venv /opt/visionrpc \
    && python3 deploy/docker/requirements.py "${extra}" > /tmp/requirements.txt \
    && /opt/visionrpc/bin/pip install -r /tmp/requirements.txt

FROM dependencies AS train-dependencies
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && python3 deploy/docker/requirements.py train > /tmp/requirements-train.txt \
    && /opt/visionrpc/bin/pip install -r /tmp/requirements-train.txt

FROM dependencies AS builder
# The whole context, so the visionrpc/<part> -> ../<part> symlinks resolve; a regular
# (non-editable) install then copies real files into site-packages. The dependencies are
# in place, so this layer is visionrpc alone.
COPY . .
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && /opt/visionrpc/bin/pip install --no-deps . \
    && /opt/visionrpc/bin/visionrpc --version

FROM train-dependencies AS train-builder
COPY . .
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && /opt/visionrpc/bin/pip install --no-deps .

FROM python AS runtime
ARG VERSION=0.1.0
ARG VARIANT=gpu
LABEL org.opencontainers.image.title="visionrpc" \
      org.opencontainers.image.description="gRPC serving for fastai-style vision models (ONNX Runtime, ${VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin visionrpc \
    && mkdir -p /models \
    && chown 10001:10001 /models
# HOME=/tmp: onnxruntime keeps a little state in HOME, and under a read-only root file system
# (the Kubernetes manifests' setting) /tmp is the one writable place.
ENV PATH=/opt/visionrpc/bin:${PATH} \
    HOME=/tmp \
    VISIONRPC_HOST=0.0.0.0 \
    VISIONRPC_PORT=8001 \
    VISIONRPC_METRICS_PORT=8002 \
    VISIONRPC_REPOSITORY=/models
WORKDIR /models
USER 10001:10001

FROM runtime AS train
COPY --from=train-builder /opt/visionrpc /opt/visionrpc
ENTRYPOINT ["visionrpc", "train"]
CMD ["--help"]

FROM runtime AS serve
COPY --from=builder /opt/visionrpc /opt/visionrpc
VOLUME ["/models"]
# 8001: gRPC (inference, grpc.health.v1, reflection); 8002: Prometheus /metrics.
EXPOSE 8001 8002
# Asks the standard gRPC health service, as a Kubernetes grpc probe does; `visionrpc health`
# exits 0 only when the server says SERVING. Change the port with VISIONRPC_PORT (not --port)
# so that this check follows it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec visionrpc health --server \"127.0.0.1:${VISIONRPC_PORT}\" --timeout 4"]
# Flags and VISIONRPC_* variables work as for `visionrpc serve` anywhere else.
ENTRYPOINT ["visionrpc", "serve"]
