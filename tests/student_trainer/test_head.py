"""Tests for student_trainer.head: the student's scores without [B, P, V] logits.

Every quantity is compared with autograd through the full logits (float64 for the head's own
functions; float32 end to end for the trainer's step on each head family), at every position.
"""

from __future__ import annotations

import pytest
import torch

from student_trainer import head as head_module
from student_trainer.batch import student_scores
from student_trainer.config import LOSSES, TrainConfig
from student_trainer.head import OutputHead, verify_head
from student_trainer.step import per_position_loss
from testkit.full_vocabulary import HEAD_FAMILIES, full_vocabulary_scores, head_family_model, synthetic_batch

TOL = 1e-5  # float32, the bound for the trainer's loss and gradients


def assert_within(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max |got - want| <= TOL, relative to the tensor's own scale when it is above 1 (float32 sums
    of values ~100, as the sampled-token loss of a random 49k-vocabulary model has, round at ~1e-5)."""
    worst = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    assert worst <= TOL * scale, f"{what}: max difference {worst:.3g} at scale {scale:.3g}"


def random_head(with_bias: bool, scale: float, softcap: float | None, vocab: int = 37, hidden: int = 6):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    return OutputHead(weight, bias, scale, softcap)


def full_logits(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    raw = hidden @ head.weight.T + (head.bias if head.bias is not None else 0.0)
    return head.transform(raw)


@pytest.mark.parametrize("with_bias,scale,softcap", [(False, 1.0, None), (True, 0.25, None), (True, 2.0, 1.5)])
def test_vocabulary_stats_equal_autograd_over_full_logits(monkeypatch, with_bias, scale, softcap):
    monkeypatch.setattr(head_module, "VOCAB_BLOCK_ELEMENTS", 37 * 4)  # blocks of 4 positions
    head = random_head(with_bias, scale, softcap)
    hidden = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hidden.requires_grad_(True)
    inputs = [hidden, head.weight] + ([head.bias] if with_bias else [])
    weights = torch.rand(3, 5, dtype=torch.float64)  # an arbitrary upstream gradient

    log_norm, top_ids, entropy = head.vocabulary_stats(hidden, top=4, entropy=True)
    grads = torch.autograd.grad((log_norm * weights).sum(), inputs)
    logits = full_logits(head, hidden)
    expected = torch.logsumexp(logits, dim=-1)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    log_q = torch.log_softmax(logits.detach(), dim=-1)

    assert log_norm.dtype == torch.float32  # the block logits are float32
    torch.testing.assert_close(log_norm.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(top_ids, logits.topk(4, dim=-1).indices)
    torch.testing.assert_close(entropy.double(), -(log_q.exp() * log_q).sum(-1), rtol=1e-5, atol=1e-5)
    assert head.vocabulary_stats(hidden, top=4)[2] is None  # not asked: not computed
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_logits_at_equal_full_logits_gathered(softcap):
    head = random_head(True, 0.5, softcap)
    hidden = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2, -1], [36, 0, 3], [4, 4, 5], [7, -1, -1]])
    inputs = [hidden, head.weight, head.bias]
    got = head.logits_at(hidden, ids)
    want = full_logits(head, hidden).gather(-1, ids.clamp(min=0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g_got, g_want in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="disagree on positions"):
        head.logits_at(hidden[:3], ids)


def loss_and_gradients(model, config, batch, scores_of) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    student = scores_of(model, batch)
    loss, _ = per_position_loss(config, student, batch)
    loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, student.metrics(batch, batch.mask)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_losses_and_gradients_equal_the_full_vocabulary_path(family):
    model = head_family_model(family)
    verify_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(vocab, lengths=[(5, 9), (3, 12), (7, 4)], top_k=8, seed=1)
    for loss_name in LOSSES:
        config = TrainConfig(student="s", prompts="p", loss=loss_name)
        head_path = loss_and_gradients(
            model, config, batch, lambda m, b: student_scores(m, b, log_norm_gradient=loss_name != "topk_rkl")
        )
        reference = loss_and_gradients(model, config, batch, full_vocabulary_scores)
        assert_within(head_path[0], reference[0], f"{loss_name} loss")
        assert head_path[1].keys() == reference[1].keys() and len(reference[1]) == len(list(model.parameters()))
        for name, grad in reference[1].items():
            assert_within(head_path[1][name], grad, f"{loss_name} gradient of {name}")
        assert head_path[2] == pytest.approx(reference[2], rel=1e-5, abs=1e-6)
        assert reference[0][batch.mask].abs().gt(0).all()  # the comparison is not 0 == 0


def test_a_head_the_trainer_cannot_compute_is_refused():
    model = head_family_model("demo")
    model.config.final_logit_softcapping = 1.0  # read by output_head, ignored by Llama's forward
    with pytest.raises(ValueError, match=r"output head \(llama\) is not one the trainer can compute"):
        verify_head(model)


def test_a_lora_adapter_on_the_lm_head_is_refused():
    from student_trainer.lora import add_lora

    model = add_lora(head_family_model("demo"), 2, 4.0, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="leave the output layer out of lora_target_modules"):
        verify_head(model)
