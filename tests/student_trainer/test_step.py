"""Tests for student_trainer.step: entropy_top_ratio trains on the highest-entropy positions of a
micro-batch, with the loss and gradients of the full-vocabulary path restricted to them; a
rollout's context tokens reach the teacher as such and carry no loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from opd.v1 import teacher_pb2
from student_trainer.teacher_router import TeacherRouter
from student_trainer.config import TrainConfig
from student_trainer.data import Prompt
from student_trainer.losses import entropy_top_count, entropy_top_mask
from student_trainer.rollouts import Rollout
from student_trainer.step import StudentTokens, _backward, per_position_loss, score_rollouts
from testkit.full_vocabulary import full_vocabulary_scores, head_family_model, synthetic_batch

TOL = 1e-5


def full_entropy(model: torch.nn.Module, batch) -> torch.Tensor:
    """[B, P] entropy of the student's full float64 softmax at each position."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    index = batch.logit_index[..., None].expand(-1, -1, logits.shape[-1])
    log_q = torch.log_softmax(logits.gather(1, index), dim=-1)
    return -(log_q.exp() * log_q).sum(-1)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["topk_rkl", "sampled_token"])
def test_entropy_top_ratio_trains_the_highest_entropy_positions_only(loss):
    model = head_family_model("demo", seed=0).train()
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(vocab, lengths=[(5, 9), (3, 12), (7, 4), (4, 10)], top_k=8, seed=2)
    ratio = 0.2
    masked = int(batch.mask.sum())
    trained_count = entropy_top_count(masked, ratio)
    assert trained_count == math.ceil(ratio * masked) < masked

    # The reference: full logits, entropy in float64, the top positions chosen by hand.
    with torch.no_grad():
        entropy = full_entropy(model, batch)
    chosen = torch.zeros_like(batch.mask)
    candidates = torch.where(batch.mask, entropy, float("-inf")).flatten()
    chosen.view(-1)[candidates.argsort(descending=True)[:trained_count]] = True
    config = TrainConfig(student="s", prompts="p", loss=loss, entropy_top_ratio=ratio)
    reference, _ = per_position_loss(
        config, full_vocabulary_scores(model, batch), dataclasses.replace(batch, mask=chosen)
    )
    (reference.sum() / trained_count).backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    metrics, trained_sums, _, _ = _backward(model, batch, config, 1, trained_count)
    got = gradients(model)
    want = float(reference.detach().sum())
    assert abs(trained_sums["loss"] - want) <= TOL * max(1.0, abs(want))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=TOL, atol=TOL)
    # The logged entropies: over every loss-carrying position, and over the trained ones (higher).
    assert metrics["entropy_mean"] == pytest.approx(float(entropy[batch.mask].mean()), abs=1e-4)
    trained_mean = trained_sums["entropy_trained_mean"] / trained_count
    assert trained_mean == pytest.approx(float(entropy[chosen].mean()), abs=1e-4)
    assert trained_mean > metrics["entropy_mean"]


def test_entropy_top_mask_keeps_the_top_share_of_the_masked_positions():
    entropy = torch.tensor([[5.0, 1.0, 4.0, 9.0], [3.0, 2.0, 8.0, 0.5]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, True]])
    # Six masked positions: ceil(0.5 x 6) = 3, the highest among them (9 and 8 are not masked).
    assert entropy_top_mask(entropy, mask, 0.5).tolist() == [[True, False, True, False], [True, False, False, False]]
    assert entropy_top_mask(entropy, mask, 1.0).equal(mask)
    assert int(entropy_top_mask(entropy, mask, 0.01).sum()) == 1  # at least one of a non-empty set
    assert not entropy_top_mask(entropy, torch.zeros_like(mask), 0.2).any()
    assert [entropy_top_count(n, 0.2) for n in (0, 1, 5, 6, 10)] == [0, 1, 1, 2, 2]


def test_entropy_top_ratio_is_validated():
    with pytest.raises(ValueError, match="entropy_top_ratio must be in"):
        TrainConfig(student="s", prompts="p", entropy_top_ratio=0.0).validate()


def test_context_tokens_of_a_rollout_reach_the_teacher_and_carry_no_loss(live_server, tiny_model):
    """A multi-turn rollout's score_mask travels with its request; the teacher masks those
    positions CONTEXT, and the batch gives them no loss."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer("w5 w6 w7")["input_ids"]
    completion = tokenizer("w9 w10 w60 w61 w62 w11 w12", add_special_tokens=False)["input_ids"] + [2]
    score_mask = np.array([1, 1, 0, 0, 0, 1, 1, 1], np.uint8)  # w60 w61 w62: a tool's output
    rollout = Rollout(prompt + completion, len(prompt), score_mask=score_mask)
    config = TrainConfig(student="s", prompts="p", top_k=8)
    with TeacherRouter(live_server.target, [""], timeout_s=30) as client:
        client.open_sessions(None)
        batch = score_rollouts(client, [rollout], [Prompt(prompt)], config, StudentTokens(tokenizer))
    context = torch.from_numpy(score_mask == 0)
    assert not batch.mask[0, : len(completion)][context].any() and batch.mask[0, : len(completion)][~context].all()
    assert (batch.reason[0, : len(completion)][context] == teacher_pb2.MASK_REASON_CONTEXT).all()
    assert batch.teacher_counts["context"] == 3
