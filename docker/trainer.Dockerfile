# Student trainer: on-policy distillation against a running teacher service.
#
# Build (the context is the repository root):
#   docker build -f docker/trainer.Dockerfile -t opd-trainer .
# Run (student weights, prompts and the output directory are mounted):
#   docker run --gpus all -v "$PWD/models:/models:ro" -v "$PWD/data:/data:ro" \
#     -v "$PWD/output:/output" opd-trainer --student /models/student \
#     --teacher teacher-host:50051 --prompts /data/prompts.jsonl --steps 1000 --output /output
#
# Same base and torch layer as docker/teacher.Dockerfile, so the two images share
# their largest layers.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /opt/opd
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --no-log-init --create-home --uid 10001 --user-group opd \
    && install -d -o opd -g opd /output

# Numeric uid:gid so runtimes that cannot resolve names (e.g. Kubernetes runAsNonRoot) still see a non-root user.
USER 10001:10001

ENTRYPOINT ["opd-train"]
CMD ["--help"]
