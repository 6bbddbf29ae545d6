"""The head path's loss and gradients under DDP and FSDP (2 gloo processes), with and without LoRA,
for every loss on the demo student and the recipe loss on a SmolLM2-shaped model (and with activation
checkpointing on the demo student), against the
full-vocabulary path over the whole batch in one process (head_worker.py does the work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5  # float32; relative to the tensor's scale when it is above 1
ATTEMPTS = 3
ABORT = "terminate called without an active exception"


def test_head_path_equals_full_vocabulary_path_under_ddp_and_fsdp(tmp_path):
    out = tmp_path / "results.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("head_worker.py")
    for _ in range(ATTEMPTS):
        result = subprocess.run(
            launcher + [str(worker), str(out)], capture_output=True, text=True, timeout=600, env=env
        )
        if result.returncode == 0 or ABORT not in result.stderr:
            break
        # A rank aborted inside torch (seen about once in three CI runs, never in 20 runs alone):
        # run again; a failure of our own code or numbers fails at once.
        print(f"worker aborted ({ABORT!r}); running it again:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    results = json.loads(out.read_text())
    assert len(results) == 20
    for case in results:
        assert case["loss"] <= TOL and case["gradients"] <= TOL, case
        assert case["parameters_with_gradients"] >= 20, case
