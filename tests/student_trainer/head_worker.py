"""Run by test_head_distributed.py under torchrun: the trainer's step on this rank's share of a batch,
under DDP or FSDP, with or without LoRA (and activation checkpointing), against the full-vocabulary path on the whole batch in one
process. Rank 0 writes the worst differences (loss, gradients) per case as JSON to argv[1]."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from student_trainer.config import TrainConfig
from student_trainer.distributed import all_reduce_sums, init_world, shutdown, unwrap, wrap_model
from student_trainer.lora import add_lora
from student_trainer.step import _backward, per_position_loss
from student_trainer.train import enable_activation_checkpointing
from testkit.full_vocabulary import batch_rows, full_vocabulary_scores, head_family_model, synthetic_batch

CASES = [
    (family, parallelism, lora, loss, False)
    for family in ("demo", "smollm2")
    for parallelism in ("ddp", "fsdp")
    for lora in (False, True)
    for loss in (("topk_rkl", "topk_rkl_unnormalized", "sampled_token") if family == "demo" else ("topk_rkl",))
] + [("demo", parallelism, lora, "topk_rkl", True) for parallelism in ("ddp", "fsdp") for lora in (False, True)]


def student(family: str, lora: bool, checkpointing: bool) -> torch.nn.Module:
    model = head_family_model(family, seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    if lora:
        model = add_lora(model, 4, 8.0, ["all-linear"])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # PEFT starts B at 0, where A gets no gradient: give both one
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.train()


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = unwrap(model).named_parameters()
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for name, p in named
        if p.grad is not None
    }


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the tensor's scale when that is above 1."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def run_case(world, family: str, parallelism: str, lora: bool, loss: str, checkpointing: bool) -> dict:
    config = TrainConfig(student="s", prompts="p", loss=loss, parallelism=parallelism)
    model = student(family, lora, checkpointing)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(vocab, lengths=[(5, 9), (3, 12), (7, 4), (4, 10)], top_k=8, seed=2)
    positions = int(batch.mask.sum())

    reference = copy.deepcopy(model)
    reference_loss, _ = per_position_loss(config, full_vocabulary_scores(reference, batch), batch)
    (reference_loss.sum() / positions).backward()
    expected = gradients(reference)

    model = wrap_model(model, parallelism, world)
    share = len(batch.targets) // world.size
    mine = batch_rows(batch, slice(world.rank * share, (world.rank + 1) * share))
    _, trained_sums, _, _ = _backward(model, mine, config, world.size, positions)
    loss_sum = all_reduce_sums({"loss": trained_sums["loss"]}, world)["loss"]
    got = gradients(model)
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    return {
        "case": f"{family} {parallelism} lora={lora} {loss} activation_checkpointing={checkpointing}",
        "loss": worst(torch.tensor(loss_sum), reference_loss.sum().detach()),
        "gradients": max(worst(got[name], expected[name]) for name in expected),
        "parameters_with_gradients": len(expected),
    }


def main() -> None:
    world = init_world("cpu")
    try:
        results = [run_case(world, *case) for case in CASES]
    finally:
        shutdown(world)
    if world.is_main:
        with open(sys.argv[1], "w") as file:
            json.dump(results, file, indent=1)
    # Skip the interpreter's teardown: the work is done and written, and gloo's threads have
    # aborted a process there now and then ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
