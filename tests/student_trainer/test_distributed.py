"""torchrun with 2 processes on CPU (gloo): DDP and FSDP against a live teacher.

One single-process run is the reference. With the same seed and global batch (and the default
micro-batch size, larger than a rank's share: each process takes its share in one micro-batch):
* a 2-process DDP run and a 2-process FSDP run have its loss curve, and a 2-process FSDP run
  with LoRA that of a single-process LoRA run (each rank samples its half of the batch with the
  same per-rollout seeds, and the loss is normalised over the global batch);
* an FSDP run resumed from its step-2 checkpoint by 2 processes ends bitwise equal to
  the uninterrupted one;
* its checkpoints load as plain Hugging Face models in one process, and a
  single-process run resumes from them (a different world size);
* the held-out evaluation of either equals the single process's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

STEPS = 3
TOL = 1e-4  # loss agreement between world sizes: float reduction order only


def run_trainer(student: Path, prompts: Path, teacher: str, output: Path, *extra: str, nproc: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + [
        "-m",
        "student_trainer",
        "--student",
        str(student),
        "--prompts",
        str(prompts),
        "--teacher",
        teacher,
        "--output",
        str(output),
        "--steps",
        str(STEPS),
        "--top-k",
        "8",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--lr",
        "3e-3",
        "--save-every",
        "1",
        "--eval-prompts",
        str(prompts),
        "--eval-every",
        "2",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]  # step 0: the evaluation alone


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(deterministic_server, student, prompts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    target = deterministic_server.target
    run_trainer(student, prompts, target, root / "single")
    run_trainer(student, prompts, target, root / "ddp", "--parallelism", "ddp", nproc=2)
    run_trainer(student, prompts, target, root / "fsdp", "--parallelism", "fsdp", nproc=2)
    lora = ("--lora-r", "4", "--lora-alpha", "8")
    run_trainer(student, prompts, target, root / "single_lora", *lora)
    run_trainer(student, prompts, target, root / "fsdp_lora", "--parallelism", "fsdp", *lora, nproc=2)
    return {name: root / name for name in ("single", "ddp", "fsdp", "single_lora", "fsdp_lora")}


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_the_single_process_loss_curve(runs, parallelism):
    single, parallel = losses(runs["single"]), losses(runs[parallelism])
    print(f"\n{parallelism} vs single-process loss by step: {list(zip(parallel, single))}")
    assert len(parallel) == len(single) == STEPS
    assert parallel == pytest.approx(single, rel=TOL, abs=TOL)
    assert single[0] != single[-1]  # the weights moved: later steps compare trained models
    # Metrics are reduced over the ranks and logged once.
    records = [json.loads(line) for line in (runs[parallelism] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert {r["world_size"] for r in records if r["step"]} == {2}
    single_records = [json.loads(line) for line in (runs["single"] / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("scored_positions") for r in records] == [r.get("scored_positions") for r in single_records]
    # Held-out evaluation (before training, at step 2 and at the end): each rank decodes its share
    # (FSDP in lock step, DDP on its own) and the means over all ranks equal one process's.
    evaluated = [(r["step"], r["eval_topk_rkl"]) for r in records if "eval_topk_rkl" in r]
    single_evaluated = [(r["step"], r["eval_topk_rkl"]) for r in single_records if "eval_topk_rkl" in r]
    assert [step for step, _ in evaluated] == [step for step, _ in single_evaluated] == [0, 2, 3]
    assert [value for _, value in evaluated] == pytest.approx(
        [value for _, value in single_evaluated], rel=TOL, abs=TOL
    )


def test_fsdp_with_lora_matches_the_single_process_lora_run(runs):
    # PEFT's generate calls the Hugging Face model inside its wrapper: FSDP's root is that model.
    single, parallel = losses(runs["single_lora"]), losses(runs["fsdp_lora"])
    assert len(parallel) == len(single) == STEPS and single[0] != single[-1]
    assert parallel == pytest.approx(single, rel=TOL, abs=TOL)
    assert (latest_checkpoint(runs["fsdp_lora"]) / "model" / "adapter_model.safetensors").exists()


def test_fsdp_checkpoint_resumes_exactly_with_two_processes(runs, deterministic_server, student, prompts, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    assert latest_checkpoint(resumed).name == "step-000002"
    # One shard of optimizer state per rank, full weights once.
    shards = sorted(path.name for path in (latest_checkpoint(resumed) / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    run_trainer(student, prompts, deterministic_server.target, resumed, "--parallelism", "fsdp", "--resume", nproc=2)
    straight, again = weights(latest_checkpoint(runs["fsdp"])), weights(latest_checkpoint(resumed))
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert losses(resumed) == losses(runs["fsdp"])


def test_checkpoint_loads_in_one_process_and_resumes_there(runs, deterministic_server, student, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = latest_checkpoint(runs["fsdp"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", dtype=torch.float32)
    saved = weights(checkpoint)
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    before = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[name], saved[name]) for name in saved)  # trained weights, not the initial ones

    # Resume the 2-process FSDP run from step 2 in one process: weights and optimizer shards are resharded.
    resumed = tmp_path / "one-process"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    run_trainer(student, prompts, deterministic_server.target, resumed, "--resume")
    assert losses(resumed) == pytest.approx(losses(runs["fsdp"]), rel=TOL, abs=TOL)
