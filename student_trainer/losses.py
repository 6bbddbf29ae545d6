"""Distillation losses (DESIGN.md section 1). Pure tensor functions, no I/O.

Conventions shared by every function:

* ``mask`` is bool or 0/1 over positions; 0 means the position carries no loss.
* Teacher support rows are ``teacher_ids`` [..., K] (student-vocabulary ids, pad = -1)
  and ``teacher_logprobs`` [..., K] (log-probs over the teacher's full vocabulary,
  pad = -inf). An entry counts as support only if its id is >= 0 *and* its log-prob
  is finite: a -inf teacher log-prob is padding by convention (and as a real entry it
  would make the reverse KL infinite).
* Masked-out positions and all-padding rows give exactly 0 loss and 0 gradient, never
  NaN. Unsafe values are replaced on the *inputs* of each operation (``torch.where``),
  because NaN * 0 in a backward pass is still NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "topk_reverse_kl",
    "support_logits",
    "support_reverse_kl",
    "sampled_token_loss",
    "log_normalizer",
    "student_token_logprobs",
    "support_metrics",
    "special_token_mask",
    "drop_special_support",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 log-probs are too coarse for a KL near zero."""
    return torch.promote_types(dtype, torch.float32)


def _support_dtype(device: torch.device) -> torch.dtype:
    """float64 for the [..., K] support math (MPS has no float64).

    It costs nothing next to the [..., V] logits, and keeps the loss accurate near
    convergence: in float32 the rounding of log q~ - log p~ alone leaves ~1e-7 of noise
    in a KL that is itself heading towards 0.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def _support_valid(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool [..., K]: support entries that take part in the loss (masked rows: none)."""
    valid = (teacher_ids >= 0) & torch.isfinite(teacher_logprobs)
    return valid & mask.bool().unsqueeze(-1)


def _masked_log_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``x`` over the ``valid`` entries of the last axis; 0 elsewhere.

    Invalid entries become -inf before the softmax, except in rows with no valid entry
    at all, which become 0: a softmax of only -inf is NaN, and although the outer
    ``where`` would keep it out of the result, it would still appear in the backward
    pass (and trip ``torch.autograd.detect_anomaly``).
    """
    row_has_any = valid.any(dim=-1, keepdim=True)
    filler = torch.where(row_has_any, float("-inf"), 0.0).to(x.dtype)
    logp = torch.log_softmax(torch.where(valid, x, filler), dim=-1)
    return torch.where(valid, logp, torch.zeros((), dtype=x.dtype))


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    renormalize: bool = True,
) -> torch.Tensor:
    """Reverse KL(student || teacher) on the teacher's top-K support, per position.

    renormalize=True (the method): both distributions are renormalised over the
    support S, so log q~(v) = z_v - logsumexp_{u in S} z_u needs only the K gathered
    logits -- no full-vocabulary softmax, hence no cost or numerical dependence on the
    rest of the vocabulary. renormalize=False (ablation, known to collapse): the
    student's full-vocabulary probabilities q against the raw teacher probabilities p,
    summed over S only.

    Shapes: student_logits [..., V], teacher_ids / teacher_logprobs [..., K],
    mask [...]. Returns [...] in float32 (float64 for float64 logits); the K-sized
    support math runs in float64. The gradient is the exact autograd gradient of the
    sum over S (no sampling).
    """
    dtype = _compute_dtype(student_logits.dtype)
    sdtype = _support_dtype(student_logits.device)
    valid = _support_valid(teacher_ids, teacher_logprobs, mask)
    # Padding ids are replaced by 0 before the gather, then excluded via ``valid``.
    safe_ids = torch.where(valid, teacher_ids, torch.zeros_like(teacher_ids)).long()
    zero = torch.zeros((), dtype=sdtype, device=student_logits.device)
    teacher_lp = torch.where(valid, teacher_logprobs.to(sdtype), zero)

    if renormalize:
        support_logits = student_logits.gather(-1, safe_ids).to(sdtype)
        log_q = _masked_log_softmax(support_logits, valid)
        log_p = _masked_log_softmax(teacher_lp, valid)
    else:
        # Sanitise masked rows so that inf/NaN logits there cannot reach the gradient.
        row_in = mask.bool().unsqueeze(-1)
        logits = torch.where(row_in, student_logits.to(dtype), zero.to(dtype))
        log_q = torch.log_softmax(logits, dim=-1).gather(-1, safe_ids).to(sdtype)
        log_q = torch.where(valid, log_q, zero)
        log_p = teacher_lp

    # exp(0) = 1 at invalid entries, but their (log_q - log_p) is 0 and is selected away.
    terms = torch.where(valid, log_q.exp() * (log_q - log_p), zero)
    return terms.sum(dim=-1).to(dtype)


class _SupportLogits(torch.autograd.Function):
    """z[n, k] = hidden[n] . weight[ids[n, k]], `chunk` rows at a time, forward and backward.

    Only hidden, weight and ids are kept for the backward pass; the gathered rows
    [chunk, K, H] are rebuilt there, so the extra memory is bounded by the chunk, not by N.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        out = hidden.new_empty(ids.shape)
        for start in range(0, ids.shape[0], chunk):
            rows = weight[ids[start : start + chunk]]  # [c, K, H]
            out[start : start + chunk] = torch.bmm(rows, hidden[start : start + chunk, :, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, ids = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad = grad.to(hidden.dtype)
        for start in range(0, ids.shape[0], ctx.chunk):
            end = start + ctx.chunk
            g = grad[start:end]  # [c, K]
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.bmm(g[:, None, :], weight[ids[start:end]]).squeeze(1)
            if grad_weight is not None:
                outer = g[:, :, None] * hidden[start:end, None, :]  # [c, K, H]
                grad_weight.index_add_(0, ids[start:end].reshape(-1), outer.reshape(-1, hidden.shape[-1]))
        return grad_hidden, grad_weight, None, None


def support_logits(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    support_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The student's logits on the teacher support only: z[..., k] = hidden . W[id_k] (+ b[id_k]).

    hidden [..., H] (final hidden states, after the final norm), lm_head_weight [V, H],
    support_ids [..., K] (pad = -1: gives the logit of id 0, which the losses ignore
    through the padding convention). Returns [..., K] in hidden's dtype, differentiable in
    hidden, weight and bias. Equal to ``(hidden @ W.T + b).gather(-1, ids)`` without the
    [..., V] logits: at V = 152k this is what makes the truncated loss cheap in memory.
    Rows go `chunk_size` at a time in both passes (see _SupportLogits).
    """
    shape = support_ids.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    ids = support_ids.reshape(-1, shape[-1]).clamp(min=0).long()
    if flat_hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and support_ids {tuple(shape)} disagree on positions")
    logits = _SupportLogits.apply(flat_hidden, lm_head_weight, ids, max(1, chunk_size))
    if bias is not None:
        logits = logits + bias[ids]
    return logits.reshape(shape)


def support_reverse_kl(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``topk_reverse_kl(hidden @ W.T + b, ...)`` with renormalize=True, from hidden states.

    The renormalised truncated KL needs the student's logits on the support only
    (topk_reverse_kl's docstring), so they are computed for the K support ids alone
    (support_logits) and never for the whole vocabulary. Same shapes and conventions as
    topk_reverse_kl, with hidden [..., H] in place of student_logits [..., V].
    """
    z = support_logits(hidden, lm_head_weight, teacher_ids, bias, chunk_size)
    # The support logits sit at positions 0..K-1 of z; padding keeps its -1.
    local = torch.arange(teacher_ids.shape[-1], device=teacher_ids.device).expand_as(teacher_ids)
    local = torch.where(teacher_ids >= 0, local, teacher_ids)
    return topk_reverse_kl(z, local, teacher_logprobs, mask, renormalize=True)


def _discounted_return_to_go(adv: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{s >= t} gamma^(s-t) a_s along the last axis.

    gamma = 0 and gamma = 1 are exact special cases. Otherwise a log2(T)-step doubling
    scan: after the step with offset k, R_t holds the sum over s in [t, t + 2k). It only
    multiplies by gamma^k <= 1, so unlike the closed form with gamma^-t it cannot
    overflow for long sequences (gamma^k underflowing to 0 is harmless).
    """
    if gamma == 0.0:
        return adv.clone()
    if gamma == 1.0:
        return adv.flip(-1).cumsum(-1).flip(-1)
    ret = adv.to(torch.float64)
    length, offset = ret.shape[-1], 1
    while offset < length:
        shifted = torch.zeros_like(ret)
        shifted[..., : length - offset] = ret[..., offset:]
        ret = ret + (gamma**offset) * shifted
        offset *= 2
    return ret.to(adv.dtype)


@torch.no_grad()
def log_normalizer(student_logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of the logits over the vocabulary [...]: the one full-vocabulary reduction
    the trainer's metrics need, computed once per batch and shared (no gradient)."""
    return torch.logsumexp(student_logits.detach().to(_compute_dtype(student_logits.dtype)), dim=-1)


@torch.no_grad()
def student_token_logprobs(student_logits: torch.Tensor, tokens: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """log q(tokens) [...] from the logits and their log_normalizer (no gradient).

    Ids < 0 (padding) read token 0; callers mask those positions.
    """
    picked = student_logits.detach().gather(-1, tokens.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    return picked.to(log_norm.dtype) - log_norm


def sampled_token_loss(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD baseline: a policy-gradient surrogate on the sampled tokens.

    student_logits [..., T, V] predict tokens [..., T] (already shifted by the caller).
    Advantage a_t = log p_teacher(y_t) - log q_student(y_t), with the student term
    detached (it is a reward, not a path for gradients). The return-to-go
    R_t = sum_{s >= t} gamma^(s-t) a_s runs over masked-in positions along the last
    axis; gamma = 0 is the usual token-level estimator. loss_t = -R_t * log q(y_t), so
    its gradient is -R_t * d log q(y_t).

    Returns (per-position loss [..., T], detached advantages a_t [..., T]), both zero
    where masked.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    dtype = _compute_dtype(student_logits.dtype)
    keep = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    logits = torch.where(keep.unsqueeze(-1), student_logits.to(dtype), zero)
    safe_tokens = torch.where(keep, tokens, torch.zeros_like(tokens)).long()

    token_logits = logits.gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)
    log_q = token_logits - torch.logsumexp(logits, dim=-1)

    teacher_lp = torch.where(keep, teacher_token_logprobs.to(dtype), zero)
    adv = torch.where(keep, teacher_lp - log_q.detach(), zero)
    ret = _discounted_return_to_go(adv, gamma)
    loss = torch.where(keep, -ret * log_q, zero)
    return loss, adv


@torch.no_grad()
def support_metrics(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    log_norm: torch.Tensor | None = None,
) -> dict[str, float]:
    """Logging metrics, averaged over positions that carry a top-K loss.

    Those are the masked-in positions with at least one support entry (an all-padding
    row has no loss, no support mass to speak of and an undefined overlap).
    "num_positions" is that count, so callers can weight averages across batches.
    Everything is 0.0 when no position qualifies. `log_norm`: the logits' log_normalizer
    if the caller has it already (else it is computed here).
    """
    valid = _support_valid(teacher_ids, teacher_logprobs, mask)
    rows = valid.any(dim=-1)
    n = int(rows.sum())
    names = ("topk_rkl", "teacher_support_mass", "student_support_mass", "topk_overlap")
    if n == 0:
        return {**{name: 0.0 for name in names}, "num_positions": 0.0}

    # Work on the selected rows only: [N, V] and [N, K].
    logits = student_logits[rows].to(_compute_dtype(student_logits.dtype))
    ids, lps, valid = teacher_ids[rows], teacher_logprobs[rows], valid[rows]
    ones = torch.ones(n, dtype=torch.bool, device=logits.device)
    log_norm = log_normalizer(logits) if log_norm is None else log_norm[rows].to(logits.dtype)

    rkl = topk_reverse_kl(logits, ids, lps, ones, renormalize=True)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).long()
    teacher_mass = torch.where(valid, lps.to(logits.dtype).exp(), 0.0).sum(-1)
    student_probs = (logits.gather(-1, safe_ids) - log_norm.unsqueeze(-1)).exp()
    student_mass = torch.where(valid, student_probs, 0.0).sum(-1)

    # Overlap: teacher id counts if it is among the student's top-k_row logits,
    # k_row = number of support entries in that row.
    k_row = valid.sum(-1)
    k_max = min(int(k_row.max()), logits.shape[-1])
    student_top = logits.topk(k_max, dim=-1).indices  # [N, k_max], best first
    in_prefix = torch.arange(k_max, device=logits.device) < k_row.unsqueeze(-1)
    hit = (safe_ids.unsqueeze(-1) == student_top.unsqueeze(-2)) & in_prefix.unsqueeze(-2)
    hits = (hit.any(-1) & valid).sum(-1)
    overlap = hits.to(logits.dtype) / k_row.to(logits.dtype)

    values = (rkl, teacher_mass, student_mass, overlap)
    out = {name: float(v.mean()) for name, v in zip(names, values)}
    out["num_positions"] = float(n)
    return out


def _dropped_ids(special_ids: Iterable[int], keep_ids: Iterable[int], device: torch.device) -> torch.Tensor:
    """Special ids minus the kept ones (e.g. EOS), as a 1-D long tensor."""
    drop = {int(i) for i in special_ids} - {int(i) for i in keep_ids}
    return torch.tensor(sorted(drop), dtype=torch.long, device=device)


def special_token_mask(tokens: torch.Tensor, special_ids: Iterable[int], keep_ids: Iterable[int] = ()) -> torch.Tensor:
    """Bool, True where the token is special and not kept: such positions carry no loss.

    End-of-sequence / end-of-turn belong in ``keep_ids``: without them in the loss the
    student never learns from the teacher when to stop.
    """
    drop = _dropped_ids(special_ids, keep_ids, tokens.device)
    if drop.numel() == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, drop)


def drop_special_support(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    special_ids: Iterable[int],
    keep_ids: Iterable[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the support with special (non-kept) entries turned into padding.

    Control tokens in the teacher's top-K are tokenizer artefacts, not language the
    student should match; removing them also renormalises the rest of the support.
    """
    ids, lps = teacher_ids.clone(), teacher_logprobs.clone()
    drop = _dropped_ids(special_ids, keep_ids, ids.device)
    if drop.numel() > 0:
        hit = torch.isin(ids, drop)
        ids[hit] = -1
        lps[hit] = float("-inf")
    return ids, lps
