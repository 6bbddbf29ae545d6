"""LoRA students (PEFT) against a live teacher: only adapters train, checkpoints are adapters,
the merged model scores like the adapter model, and a LoRA run resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.checkpoint import latest_checkpoint
from student_trainer.config import load_config
from student_trainer.lora import add_lora, merge_lora, merged_weights, trainable_parameter_names
from student_trainer.train import train


@pytest.fixture(scope="module")
def lora_run(live_server, student, prompts, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora")
    settings = dict(
        student=str(student),
        teacher=live_server.target,
        prompts=str(prompts),
        output=str(output),
        top_k=8,
        batch_size=4,
        micro_batch_size=2,
        max_new_tokens=6,
        lr=1e-2,
        save_every=1,
        keep_checkpoints=3,
        lora_r=4,
        lora_alpha=8.0,
        lora_target_modules=["q_proj", "v_proj"],
    )
    train(load_config(None, **settings, steps=2))
    train(load_config(None, **settings, steps=3), resume=True)
    return output


def test_only_adapter_parameters_train(student):
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(student), 4, 8.0, ["q_proj", "v_proj"])
    names = trainable_parameter_names(model)
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names), names
    assert all(("q_proj" in name or "v_proj" in name) for name in names)


def test_lora_checkpoint_is_an_adapter_over_untouched_base_weights(lora_run, student):
    checkpoint = latest_checkpoint(lora_run)
    assert checkpoint.name == "step-000003"
    files = {path.name for path in (checkpoint / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    adapter = load_file(checkpoint / "model" / "adapter_model.safetensors")
    # PEFT starts B at zero: a non-zero B is what training changed.
    b_matrices = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert b_matrices and all(tensor.abs().max() > 0 for tensor in b_matrices)
    assert json.loads((checkpoint / "model" / "adapter_config.json").read_text())["r"] == 4
    steps = [json.loads(line)["step"] for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the resumed run continued at step 3


def test_merged_model_scores_like_the_adapter_model(lora_run, student, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = latest_checkpoint(lora_run) / "model"
    merge_lora(str(adapter_dir), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), adapter_dir)
    adapted.eval()
    input_ids = torch.randint(4, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (merged(input_ids=input_ids).logits - adapted(input_ids=input_ids).logits).abs().max()
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    with torch.no_grad():
        moved = (base(input_ids=input_ids).logits - adapted(input_ids=input_ids).logits).abs().max()
    print(f"\nmerged vs adapter logits max |diff| {float(difference):.2e} (adapter vs base {float(moved):.2e})")
    assert difference < 1e-5 < moved
    # The weights a rollout engine receives are the merged model's.
    pushed = dict(merged_weights(adapted))
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-6)
