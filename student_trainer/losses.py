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

import math
from collections.abc import Iterable

import torch

__all__ = [
    "topk_reverse_kl",
    "union_support",
    "sampled_token_loss",
    "support_metrics",
    "special_token_mask",
    "drop_special_support",
    "entropy_top_count",
    "entropy_top_mask",
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
    student_support_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    log_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL(student || teacher) on the teacher's top-K support S, per position.

    student_support_logits [..., K]: the student's logit of each teacher_ids [..., K] entry
    (head.OutputHead.logits_at, or full logits gathered at the ids). log_norm None (the
    method): both distributions are renormalised over S, log q~(v) = z_v - logsumexp_S z,
    so nothing outside S is needed. log_norm [...] given (ablation, known to collapse): the
    student's full-vocabulary log-probabilities z_v - log_norm against the teacher's raw
    log-probabilities, summed over S; log_norm is the logsumexp of the student's logits over
    the whole vocabulary, and the gradient flows through it too.

    Returns [...] in float32 (float64 for float64 logits); the K-sized support math runs in
    float64. The gradient is the exact autograd gradient of the sum over S (no sampling).
    """
    dtype = _compute_dtype(student_support_logits.dtype)
    sdtype = _support_dtype(student_support_logits.device)
    valid = _support_valid(teacher_ids, teacher_logprobs, mask)
    zero = torch.zeros((), dtype=sdtype, device=student_support_logits.device)
    teacher_lp = torch.where(valid, teacher_logprobs.to(sdtype), zero)
    z = torch.where(valid, student_support_logits.to(sdtype), zero)
    if log_norm is None:
        log_q = _masked_log_softmax(z, valid)
        log_p = _masked_log_softmax(teacher_lp, valid)
    else:
        norm = torch.where(valid.any(dim=-1), log_norm.to(sdtype), zero)
        log_q = torch.where(valid, z - norm.unsqueeze(-1), zero)
        log_p = teacher_lp
    # exp(0) = 1 at invalid entries, but their (log_q - log_p) is 0 and is selected away.
    terms = torch.where(valid, log_q.exp() * (log_q - log_p), zero)
    return terms.sum(dim=-1).to(dtype)


def union_support(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K support joined with the student's candidates, as one support row.

    teacher_ids/teacher_logprobs [..., K] as everywhere here; candidate_ids [..., M] the student's
    own top-M ids (pad -1) and candidate_logprobs [..., M] the teacher's log-probabilities of
    them (ScoreResponse.candidate_logprobs; -inf where the teacher cannot write the token).
    Returns ids and log-probabilities [..., K + M]: the teacher's entries, then each candidate not
    already in the row, pads (-1, -inf) where a candidate repeats an id before it. Passed to
    topk_reverse_kl, the loss is renormalised over the union, so the mass the student puts on
    its own candidates outside the teacher's top-K is pushed towards the teacher's value instead
    of being invisible to the loss. Teacher data only: no gradient flows here.
    """
    teacher_kept = (teacher_ids >= 0) & torch.isfinite(teacher_logprobs)
    candidate_kept = (candidate_ids >= 0) & torch.isfinite(candidate_logprobs)
    in_teacher = (candidate_ids.unsqueeze(-1) == torch.where(teacher_kept, teacher_ids, -2).unsqueeze(-2)).any(-1)
    same = candidate_ids.unsqueeze(-1) == candidate_ids.unsqueeze(-2)  # [..., M, M]
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril(-1)
    repeated = (same & earlier & candidate_kept.unsqueeze(-2)).any(-1)
    new = candidate_kept & ~in_teacher & ~repeated
    ids = torch.cat([teacher_ids, torch.where(new, candidate_ids, -1)], dim=-1)
    padded = torch.where(new, candidate_logprobs.to(teacher_logprobs.dtype), float("-inf"))
    logprobs = torch.cat([teacher_logprobs, padded], dim=-1)
    return ids, logprobs


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


def sampled_token_loss(
    token_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD baseline: a policy-gradient surrogate on the sampled tokens.

    token_logprobs [..., T]: the student's log q(y_t) of its sampled tokens, with gradient.
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
    dtype = _compute_dtype(token_logprobs.dtype)
    keep = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=token_logprobs.device)
    log_q = torch.where(keep, token_logprobs.to(dtype), zero)
    teacher_lp = torch.where(keep, teacher_token_logprobs.to(dtype), zero)
    adv = torch.where(keep, teacher_lp - log_q.detach(), zero)
    ret = _discounted_return_to_go(adv, gamma)
    loss = torch.where(keep, -ret * log_q, zero)
    return loss, adv


@torch.no_grad()
def support_metrics(
    student_support_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    log_norm: torch.Tensor,
    student_top_ids: torch.Tensor,
) -> dict[str, float]:
    """Logging metrics, averaged over positions that carry a top-K loss.

    student_support_logits [..., K] as in topk_reverse_kl; log_norm [...] the student's
    full-vocabulary logsumexp; student_top_ids [..., >= K] its best ids, best first. The
    positions are the masked-in ones with at least one support entry (an all-padding row
    has no loss, no support mass to speak of and an undefined overlap). "num_positions" is
    that count, so callers can weight averages across batches. Everything is 0.0 when no
    position qualifies.
    """
    valid = _support_valid(teacher_ids, teacher_logprobs, mask)
    rows = valid.any(dim=-1)
    n = int(rows.sum())
    names = ("topk_rkl", "teacher_support_mass", "student_support_mass", "topk_overlap")
    if n == 0:
        return {**{name: 0.0 for name in names}, "num_positions": 0.0}

    z = student_support_logits[rows].to(_compute_dtype(student_support_logits.dtype))
    ids, lps, valid = teacher_ids[rows], teacher_logprobs[rows], valid[rows]
    ones = torch.ones(n, dtype=torch.bool, device=z.device)
    rkl = topk_reverse_kl(z, ids, lps, ones)
    teacher_mass = torch.where(valid, lps.to(z.dtype).exp(), 0.0).sum(-1)
    student_mass = torch.where(valid, (z - log_norm[rows].to(z.dtype).unsqueeze(-1)).exp(), 0.0).sum(-1)

    # Overlap: teacher id counts if it is among the student's top-k_row ids,
    # k_row = number of support entries in that row.
    k_row = valid.sum(-1)
    student_top = student_top_ids[rows][:, : int(k_row.max())].to(ids.device)
    in_prefix = torch.arange(student_top.shape[-1], device=z.device) < k_row.unsqueeze(-1)
    hit = (ids.unsqueeze(-1) == student_top.unsqueeze(-2)) & in_prefix.unsqueeze(-2)
    hits = (hit.any(-1) & valid).sum(-1)
    overlap = hits.to(z.dtype) / k_row.to(z.dtype)

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


def entropy_top_count(positions: int, ratio: float) -> int:
    """How many of `positions` loss-carrying positions the entropy selection keeps: ceil(ratio x n),
    at least one of a non-empty set."""
    return min(positions, max(1, math.ceil(ratio * positions))) if positions else 0


def entropy_top_mask(entropy: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool, like ``mask``: the entropy_top_count(n, ratio) positions of ``mask`` where the student's
    entropy is highest (torch.topk breaks ties), the others off. The top 20% by entropy is where
    the student is still choosing; the rest carry little signal (the entropy_top_ratio recipe)."""
    chosen = mask.bool().reshape(-1)
    keep = entropy_top_count(int(chosen.sum()), ratio)
    scores = torch.where(chosen, entropy.reshape(-1).double(), float("-inf"))
    out = torch.zeros_like(chosen)
    if keep:
        out[torch.topk(scores, keep, sorted=False).indices] = True
    return out.reshape(mask.shape)
