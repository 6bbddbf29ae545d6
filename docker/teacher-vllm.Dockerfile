# Teacher service with the vLLM engine (`--engine vllm`; CUDA GPUs): the same server as
# docker/teacher.Dockerfile, plus vLLM, which scores prompts through its own engine.
#
# Build (the context is the repository root):
#   docker build -f docker/teacher-vllm.Dockerfile -t opd-teacher-vllm .
# Run (weights are mounted read-only at /models; nothing is downloaded at build time):
#   docker run --gpus all --shm-size 2g -p 50051:50051 -v "$PWD/models:/models:ro" opd-teacher-vllm
#
# vLLM pins torch exactly: TORCH_VERSION must be the one VLLM_VERSION requires (vllm 0.34.0:
# torch 2.14.0), so pip keeps the torch layer below instead of replacing it. LoRA teachers
# (--teacher NAME=BASE+ADAPTER_DIR) are served through vLLM's LoRA requests.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.14.0
ARG VLLM_VERSION=0.34.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    VLLM_NO_USAGE_STATS=1

# torch, then vLLM and its CUDA kernels: the largest layer, before the project code.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "vllm==${VLLM_VERSION}"

# Address probed by the HEALTHCHECK below.
ENV OPD_HEALTH_TARGET=127.0.0.1:50051

WORKDIR /opt/opd
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --no-log-init --create-home --uid 10001 --user-group opd

USER 10001:10001

EXPOSE 50051

# vLLM loads and profiles the model before the server reports SERVING: a longer start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; ch = grpc.insecure_channel(os.environ.get('OPD_HEALTH_TARGET', '127.0.0.1:50051')); r = rpc.HealthStub(ch).Check(pb.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == pb.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["opd-teacher", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--engine", "vllm", "--device", "cuda", "--model", "/models/teacher"]
