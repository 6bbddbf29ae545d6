"""Tests for student_trainer.losses.sampled_token_loss, the sampled-token OPD baseline, against returns
computed by hand and by the plain recursion."""

from __future__ import annotations

import pytest
import torch

from student_trainer.losses import sampled_token_loss as loss_of_logprobs


def sampled_token_loss(logits, tokens, teacher, mask, gamma=0.0):
    """The loss from full logits [..., T, V]: log q(y_t) by log-softmax, as the trainer's head gives it."""
    token_logprobs = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return loss_of_logprobs(token_logprobs, teacher, mask, gamma=gamma)


def sampled_inputs():
    """B=2, T=4, V=5 with chosen advantages, so the returns can be computed by hand."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    tokens = torch.tensor([[1, 4, 0, 2], [3, 3, -1, 0]])  # masked pad token -1
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    advantages = torch.tensor([[1.0, 2.0, 8.0, 4.0], [-1.0, 5.0, 3.0, 2.0]], dtype=torch.float64)
    log_q = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    teacher = log_q + advantages
    teacher[~mask] = float("nan")  # unscored positions may hold anything
    return logits, tokens, teacher, mask, log_q


# Hand-computed R_t over masked-in positions (advantages [[1,2,-,4],[-1,-,-,2]]).
HAND_RETURNS = {
    0.0: [[1.0, 2.0, 0.0, 4.0], [-1.0, 0.0, 0.0, 2.0]],
    0.5: [[1 + 0.5 * 2 + 0.125 * 4, 2 + 0.25 * 4, 0.0, 4.0], [-1 + 0.125 * 2, 0.0, 0.0, 2.0]],
    1.0: [[7.0, 6.0, 0.0, 4.0], [1.0, 0.0, 0.0, 2.0]],
}


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sampled_token_loss_matches_hand_computed(gamma):
    logits, tokens, teacher, mask, log_q = sampled_inputs()
    x = logits.clone().requires_grad_(True)
    loss, adv = sampled_token_loss(x, tokens, teacher, mask, gamma=gamma)
    returns = torch.tensor(HAND_RETURNS[gamma], dtype=torch.float64)

    expected_adv = torch.tensor([[1.0, 2.0, 0.0, 4.0], [-1.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    expected_loss = torch.where(mask, -returns * log_q, 0.0)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)

    # Gradient: -R_t * d log q(y_t) / dz = -R_t * (onehot(y_t) - softmax(z_t)); 0 where masked.
    (grad,) = torch.autograd.grad(loss.sum(), x)
    onehot = torch.nn.functional.one_hot(tokens.clamp(min=0), 5).double()
    expected_grad = -returns[..., None] * (onehot - torch.softmax(logits, -1)) * mask[..., None]
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 0.99, 0.999])
def test_discounted_return_long_sequence_matches_recursion(gamma):
    # T = 3000: a closed form with gamma^-t would overflow (0.5^-3000).
    g = torch.Generator().manual_seed(1)
    t_len, vocab = 3000, 7
    logits = torch.randn(2, t_len, vocab, generator=g)
    tokens = torch.randint(0, vocab, (2, t_len), generator=g)
    teacher = -torch.rand(2, t_len, generator=g) * 3
    mask = torch.rand(2, t_len, generator=g) > 0.2
    loss, adv = sampled_token_loss(logits, tokens, teacher, mask, gamma=gamma)

    log_q = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    a = torch.where(mask, teacher.double() - log_q, 0.0).tolist()
    expected = []
    for row, m_row, lq_row in zip(a, mask.tolist(), log_q.tolist()):
        ret, out = 0.0, [0.0] * t_len
        for t in reversed(range(t_len)):  # R_t = a_t + gamma R_{t+1}
            ret = row[t] + gamma * ret
            out[t] = -ret * lq_row[t] if m_row[t] else 0.0
        expected.append(out)
    assert torch.isfinite(loss).all()
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_sampled_token_loss_rejects_bad_gamma():
    logits, tokens, teacher, mask, _ = sampled_inputs()
    for gamma in (-0.1, 1.5):
        with pytest.raises(ValueError):
            sampled_token_loss(logits, tokens, teacher, mask, gamma=gamma)
