"""Tests for student_trainer.batch: packed micro-batches give the padded layout's scores, losses
and gradients; bfloat16 autocast stays close to float32."""

from __future__ import annotations

import pytest
import torch

from student_trainer.batch import collate, student_scores
from student_trainer.config import LOSSES, TrainConfig
from student_trainer.step import per_position_loss, training_precision
from testkit.full_vocabulary import head_family_model, synthetic_rollouts

TOL = 1e-5
LENGTHS = [(4, 8), (2, 2), (3, 13), (1, 3)]  # (prompt, completion): 12, 4, 16 and 4 tokens


def batches(vocab: int):
    rollouts, scores = synthetic_rollouts(vocab, LENGTHS, top_k=6)
    options = dict(pad_id=0, special_ids=[0, 1, 2], keep_ids=[2], mask_special_tokens=True)
    return collate(rollouts, scores, **options), collate(rollouts, scores, **options, packed=True)


def loss_and_gradients(model, config: TrainConfig, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    with training_precision(config, model):
        student = student_scores(model, batch, log_norm_gradient=config.loss != "topk_rkl")
        loss, _ = per_position_loss(config, student, batch)
    loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, student.metrics(batch, batch.mask)


def test_packed_layout_fills_rows_as_long_as_the_longest_rollout():
    padded, packed = batches(vocab=300)
    # First fit, longest first, into rows of 16: [16], [12, 4], [4].
    assert packed.packed and not padded.packed
    assert packed.input_ids.shape == (3, 16) and padded.input_ids.shape == (4, 16)
    assert packed.model_rows().tolist() == [1, 1, 0, 2]
    for rollout in range(4):  # each rollout's tokens sit in its row at positions 0, 1, ...
        row, first = int(packed.model_rows()[rollout]), int(packed.logit_index[rollout, 0])
        start = first + 1 - int(padded.logit_index[rollout, 0] + 1)  # its offset in the row
        length = int(padded.attention_mask[rollout].sum())
        assert torch.equal(packed.input_ids[row, start : start + length], padded.input_ids[rollout, :length])
        assert torch.equal(packed.position_ids[row, start : start + length], torch.arange(length))
    for name in ("targets", "valid", "mask", "teacher_ids", "teacher_logprobs"):
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name


@pytest.mark.parametrize("family", ["demo", "smollm2", "gemma2"])
def test_packed_micro_batch_gives_the_padded_loss_and_gradients(family):
    model = head_family_model(family)
    vocab = model.get_output_embeddings().weight.shape[0]
    padded, packed = batches(min(vocab, 300))
    for loss_name in LOSSES:
        config = TrainConfig(student="s", prompts="p", loss=loss_name)
        want, got = loss_and_gradients(model, config, padded), loss_and_gradients(model, config, packed)
        scale = max(1.0, float(want[0].abs().max()))
        assert float((got[0] - want[0]).abs().max()) <= TOL * scale, loss_name
        assert float(want[0].abs().sum()) > 0
        for name, grad in want[1].items():
            worst = float((got[1][name] - grad).abs().max())
            assert worst <= TOL * max(1.0, float(grad.abs().max())), f"{loss_name} {name}: {worst:.3g}"
        assert got[2] == pytest.approx(want[2], rel=1e-5, abs=1e-6)


def test_bfloat16_autocast_stays_close_to_float32():
    model = head_family_model("smollm2")
    padded, _ = batches(300)
    runs = {
        dtype: loss_and_gradients(model, TrainConfig(student="s", prompts="p", dtype=dtype), padded)
        for dtype in ("float32", "bfloat16")
    }
    loss32, loss16 = runs["float32"][0], runs["bfloat16"][0]
    assert float((loss16 - loss32).abs().max()) <= 0.05 * float(loss32.abs().max())
    assert not torch.equal(loss16, loss32)  # bfloat16 did run
    for name, grad in runs["float32"][1].items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), runs["bfloat16"][1][name].flatten(), dim=0)
        assert cosine > 0.98, name
