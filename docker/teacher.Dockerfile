# Teacher service: serves teacher top-K log-probabilities over gRPC (port 50051).
#
# Build (the context is the repository root):
#   docker build -f docker/teacher.Dockerfile -t opd-teacher .
# Run (weights are mounted read-only at /models; nothing is downloaded at build time):
#   docker run --gpus all -p 50051:50051 -v "$PWD/models:/models:ro" opd-teacher
#
# Base: Debian 12 slim with CPython 3.11. torch is installed from PyPI, whose Linux
# x86_64 wheel is CUDA-enabled and carries its own CUDA/cuDNN runtime libraries,
# so only the host's NVIDIA driver (via the NVIDIA container toolkit) is needed.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

# torch first, in its own layer: it is by far the largest dependency and changes
# far less often than the project code, so rebuilds after code edits reuse it.
# Everything up to here is identical in docker/trainer.Dockerfile, so both images
# share these layers in the build cache.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

# Address probed by the HEALTHCHECK below.
ENV OPD_HEALTH_TARGET=127.0.0.1:50051

WORKDIR /opt/opd
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --no-log-init --create-home --uid 10001 --user-group opd

# Numeric uid:gid so runtimes that cannot resolve names (e.g. Kubernetes runAsNonRoot) still see a non-root user.
USER 10001:10001

EXPOSE 50051

# Standard grpc.health.v1 check of the overall server status (service "").
# OPD_HEALTH_TARGET must follow --port if the default CMD is overridden.
# A generous start period leaves time to load large teacher weights.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; ch = grpc.insecure_channel(os.environ.get('OPD_HEALTH_TARGET', '127.0.0.1:50051')); r = rpc.HealthStub(ch).Check(pb.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == pb.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["opd-teacher", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--model", "/models/teacher"]
