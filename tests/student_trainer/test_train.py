"""The training loop against a live teacher service on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer import checkpoint as checkpoint_module
from student_trainer.config import load_config
from student_trainer.train import train


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_opd_train_cli_lowers_heldout_reverse_kl(live_server, student, prompts, tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "student_trainer.cli",
        "--student",
        str(student),
        "--teacher",
        live_server.target,
        "--prompts",
        str(prompts),
        "--eval-prompts",
        str(prompts),
        "--steps",
        "20",
        "--output",
        str(output),
        "--top-k",
        "8",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "12",
        "--eval-every",
        "10",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(output)
    evals = [(r["step"], r["eval_topk_rkl"]) for r in records if "eval_topk_rkl" in r]
    print("held-out truncated reverse KL by step:", evals)
    assert [step for step, _ in evals] == [0, 10, 20]
    assert evals[-1][1] < 0.8 * evals[0][1]
    assert "finished step 20" in result.stdout
    step_keys = set(records[1])
    for key in (
        "loss",
        "topk_rkl",
        "teacher_support_mass",
        "student_support_mass",
        "topk_overlap",
        "masked",
        "masked_special",
        "negative_advantage_share",
        "response_length",
        "grad_norm",
        "tokens_per_s",
        "teacher_latency_s",
    ):
        assert key in step_keys, key
    assert (output / "checkpoints" / "step-000020" / "model" / "config.json").exists()


@pytest.mark.parametrize("loss", ["sampled_token", "topk_rkl_unnormalized"])
def test_other_losses_train(live_server, student, prompts, tmp_path, loss):
    config = load_config(
        None,
        student=str(student),
        teacher=live_server.target,
        prompts=str(prompts),
        output=str(tmp_path),
        steps=2,
        loss=loss,
        gamma=0.5,
        top_k=8,
        batch_size=4,
        micro_batch_size=2,
        max_new_tokens=6,
    )
    records = train(config)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_student_candidates_widen_the_support_the_loss_sees(live_server, student, prompts, tmp_path):
    """Same rollouts (recording candidates changes no sample): on the first step, before any
    update, the student's mass on the union support is above its mass on the teacher's top-K."""
    settings = dict(student=str(student), teacher=live_server.target, prompts=str(prompts), steps=2, top_k=4)
    settings |= dict(batch_size=4, micro_batch_size=2, max_new_tokens=6, seed=5)
    alone = train(load_config(None, **settings, output=str(tmp_path / "alone")))
    union = train(load_config(None, **settings, output=str(tmp_path / "union"), candidates=8))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in union)
    print(
        f"\nstudent mass on the support: top-4 {alone[0]['student_support_mass']:.3f}, union with its top-8 "
        f"{union[0]['student_support_mass']:.3f}"
    )
    assert union[0]["student_support_mass"] > alone[0]["student_support_mass"] + 0.05
    assert union[0]["response_length"] == alone[0]["response_length"]


def test_bfloat16_packing_and_activation_checkpointing_train(live_server, student, prompts, tmp_path):
    settings = dict(student=str(student), teacher=live_server.target, prompts=str(prompts), steps=3, top_k=8)
    settings |= dict(batch_size=4, micro_batch_size=4, max_new_tokens=6, lr=1e-2, seed=3)
    plain = train(load_config(None, **settings, output=str(tmp_path / "plain")))
    packed = train(load_config(None, **settings, output=str(tmp_path / "packed"), packing=True))
    # Same rollouts, same step: packing changes the layout only (float rounding).
    assert packed[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
    scaled = train(
        load_config(None, **settings, output=str(tmp_path / "bf16"), dtype="bfloat16", activation_checkpointing=True)
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in scaled)
    assert scaled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05) and scaled[0]["loss"] != plain[0]["loss"]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_module.latest_checkpoint(output) / "model" / "model.safetensors")


def test_resume_continues_exactly(deterministic_server, student, prompts, tmp_path):
    settings = dict(
        student=str(student),
        teacher=deterministic_server.target,
        prompts=str(prompts),
        top_k=8,
        batch_size=4,
        micro_batch_size=2,
        max_new_tokens=6,
        lr=3e-3,
        save_every=2,
    )
    train(load_config(None, **settings, steps=4, output=str(tmp_path / "straight")))
    train(load_config(None, **settings, steps=2, output=str(tmp_path / "resumed")))
    train(load_config(None, **settings, steps=4, output=str(tmp_path / "resumed")), resume=True)

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [record["step"] for record in read_metrics(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "straight")[-1]["loss"] == read_metrics(tmp_path / "resumed")[-1]["loss"]


def test_resumed_run_keeps_its_teacher_pin(live_server, tiny_model, student, prompts, tmp_path):
    """A --pin-teacher run saves the pin; resumed against other teacher weights, it refuses to train."""
    from student_trainer.client import TeacherRequestError
    from teacher_server.identity import weights_sha256
    from tests.conftest import LiveServer, server_config
    from testkit.tiny_model import build_tiny_model

    settings = dict(
        student=str(student),
        prompts=str(prompts),
        output=str(tmp_path / "run"),
        top_k=8,
        batch_size=2,
        micro_batch_size=2,
        max_new_tokens=4,
        save_every=1,
        pin_teacher=True,
    )
    train(load_config(None, **settings, teacher=live_server.target, steps=1))
    state = checkpoint_module.load_trainer_state(checkpoint_module.latest_checkpoint(tmp_path / "run"))
    assert state.teacher_pin == f"{tiny_model}@{weights_sha256(str(tiny_model))}"

    swapped = LiveServer(server_config(build_tiny_model(tmp_path / "other-teacher", seed=5)))
    try:
        with pytest.raises(TeacherRequestError) as caught:
            train(load_config(None, **settings, teacher=swapped.target, steps=2), resume=True)
        assert "FAILED_PRECONDITION" in str(caught.value.code) and "pin" in caught.value.message.lower()
    finally:
        swapped.stop()
    assert checkpoint_module.latest_checkpoint(tmp_path / "run").name == "step-000001"  # nothing trained on it


def test_failed_checkpoint_write_leaves_previous_intact(live_server, student, prompts, tmp_path, monkeypatch):
    config = load_config(
        None,
        student=str(student),
        teacher=live_server.target,
        prompts=str(prompts),
        output=str(tmp_path),
        steps=2,
        top_k=8,
        batch_size=2,
        micro_batch_size=2,
        max_new_tokens=4,
        save_every=1,
    )
    real_save = torch.save
    calls = {"count": 0}

    def failing_second_save(obj, path, *args, **kwargs):
        # The trainer state is the last file of a checkpoint: step 2's weights and optimizer
        # shards are already in its staging directory when this fails.
        if str(path).endswith("trainer_state.pt"):
            calls["count"] += 1
            if calls["count"] == 2:
                raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(config)
    checkpoints = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-000001"], checkpoints  # no half-written step-000002, no temp dir
    assert checkpoint_module.latest_checkpoint(tmp_path).name == "step-000001"


def test_example_config_loads_and_flags_win(tmp_path):
    example = Path(__file__).resolve().parents[2] / "student_trainer" / "configs" / "topk_rkl.yaml"
    config = load_config(example, student="s", prompts="p.jsonl", lr=1e-4)
    assert config.loss == "topk_rkl" and config.top_k == 32 and config.top_p == 0.9
    assert config.lr == 1e-4  # the flag wins over the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: topk_rkl\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match="unknown keys.*learning_rate"):
        load_config(bad, student="s", prompts="p.jsonl")
    with pytest.raises(ValueError, match="loss must be one of"):
        load_config(None, student="s", prompts="p.jsonl", loss="kl")
