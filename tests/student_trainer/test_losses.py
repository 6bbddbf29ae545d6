"""Tests for student_trainer.losses against independent plain-Python references (the sampled-token
baseline: test_sampled_token_loss.py)."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.losses import (
    drop_special_support,
    special_token_mask,
    support_metrics,
    topk_reverse_kl,
    union_support,
)

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------


def make_inputs(shape: tuple[int, ...], vocab: int, k: int, seed: int, dtype=torch.float32):
    """Logits [*shape, V], a unique-id support [*shape, K] with some pads, a mask.

    Row 0 (flattened) is all padding, row 1 is masked out, every third row has pads
    at the end; teacher log-probs are normalised over a full random teacher vocab.
    """
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    logits = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0).to(dtype)
    teacher_raw = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    teacher_full = torch.log_softmax(teacher_raw, -1)
    # Support ids never include id 0, so padding gathers (clamped to 0) hit a non-support logit.
    ids = torch.stack([torch.randperm(vocab - 1, generator=g)[:k] + 1 for _ in range(n)])
    lps = teacher_full.gather(-1, ids).to(torch.float32)
    for r in range(0, n, 3):
        n_pad = r % k if r % k else 2
        ids[r, k - n_pad :] = -1
        lps[r, k - n_pad :] = NEG_INF
    ids[0] = -1
    lps[0] = NEG_INF
    mask = torch.ones(n, dtype=torch.bool)
    mask[1] = False
    if n > 5:
        mask[5] = False
    return (
        logits.reshape(*shape, vocab),
        ids.reshape(*shape, k),
        lps.reshape(*shape, k),
        mask.reshape(shape),
    )


# ---------------------------------------------------------------------------
# Plain-Python float64 reference, straight from the formulas (no torch ops)
# ---------------------------------------------------------------------------


def ref_rkl_row(z: list[float], ids: list[int], lps: list[float], renormalize: bool):
    """(loss, dloss/dz) for one position, written from the formulas with Python floats."""
    support = [(v, lp) for v, lp in zip(ids, lps) if v >= 0 and lp != NEG_INF]
    grad = [0.0] * len(z)
    if not support:
        return 0.0, grad
    if renormalize:
        zmax = max(z[v] for v, _ in support)
        lse_q = zmax + math.log(sum(math.exp(z[v] - zmax) for v, _ in support))
        pmax = max(lp for _, lp in support)
        lse_p = pmax + math.log(sum(math.exp(lp - pmax) for _, lp in support))
        log_q = {v: z[v] - lse_q for v, _ in support}
        log_p = {v: lp - lse_p for v, lp in support}
        loss = sum(math.exp(log_q[v]) * (log_q[v] - log_p[v]) for v, _ in support)
        # d/dz_v of sum_u q~_u (log q~_u - log p~_u) = q~_v (r_v - L), v in S.
        for v, _ in support:
            grad[v] = math.exp(log_q[v]) * ((log_q[v] - log_p[v]) - loss)
        return loss, grad
    zmax = max(z)
    lse = zmax + math.log(sum(math.exp(x - zmax) for x in z))
    q = [math.exp(x - lse) for x in z]
    terms = {v: q[v] * ((z[v] - lse) - lp) for v, lp in support}
    loss = sum(terms.values())
    # dq_v/dz_j = q_v (delta_vj - q_j), so
    # dL/dz_j = [j in S] q_j (r_j + 1) - q_j sum_{v in S} q_v (r_v + 1).
    weighted = sum(q[v] * ((z[v] - lse) - lp + 1.0) for v, lp in support)
    for j in range(len(z)):
        grad[j] = -q[j] * weighted
    for v, lp in support:
        grad[v] += q[v] * ((z[v] - lse) - lp + 1.0)
    return loss, grad


def ref_rkl(logits, ids, lps, mask, renormalize):
    vocab, k = logits.shape[-1], ids.shape[-1]
    z_rows = logits.double().reshape(-1, vocab).tolist()
    id_rows = ids.reshape(-1, k).tolist()
    lp_rows = lps.double().reshape(-1, k).tolist()
    keep = mask.reshape(-1).tolist()
    losses, grads = [], []
    for z, i, lp, m in zip(z_rows, id_rows, lp_rows, keep):
        loss, grad = ref_rkl_row(z, i, lp, renormalize) if m else (0.0, [0.0] * vocab)
        losses.append(loss)
        grads.append(grad)
    shape = mask.shape
    return (
        torch.tensor(losses, dtype=torch.float64).reshape(shape),
        torch.tensor(grads, dtype=torch.float64).reshape(*shape, vocab),
    )


def rkl(logits, ids, lps, mask, renormalize=True):
    """topk_reverse_kl from full logits [..., V], as the trainer's head computes its inputs: the
    logits at the support ids, and for the unnormalised form the logsumexp over the vocabulary
    (of masked-in rows: the trainer's hidden states are finite wherever it computes them)."""
    support = logits.gather(-1, ids.clamp(min=0))
    if renormalize:
        return topk_reverse_kl(support, ids, lps, mask)
    rows = mask.bool().unsqueeze(-1)
    log_norm = torch.logsumexp(torch.where(rows, logits, torch.zeros((), dtype=logits.dtype)), dim=-1)
    return topk_reverse_kl(support, ids, lps, mask, log_norm=log_norm)


def metrics(logits, ids, lps, mask):
    """support_metrics from full logits [..., V]."""
    top = logits.topk(min(ids.shape[-1], logits.shape[-1]), dim=-1).indices
    return support_metrics(logits.gather(-1, ids.clamp(min=0)), ids, lps, mask, torch.logsumexp(logits, -1), top)


def loss_and_grad(logits, ids, lps, mask, renormalize=True):
    x = logits.clone().requires_grad_(True)
    loss = rkl(x, ids, lps, mask, renormalize=renormalize)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


SHAPES = [(7,), (2, 5), (3, 4)]


# ---------------------------------------------------------------------------
# topk_reverse_kl
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_rkl_matches_reference_float64(shape, renormalize):
    logits, ids, lps, mask = make_inputs(shape, vocab=41, k=8, seed=len(shape) * 10 + shape[0], dtype=torch.float64)
    loss, grad = loss_and_grad(logits, ids, lps, mask, renormalize)
    ref_loss, ref_grad = ref_rkl(logits, ids, lps, mask, renormalize)
    assert loss.dtype == torch.float64 and loss.shape == mask.shape
    assert ref_loss[mask].abs().max() > 1e-2  # the comparison is not trivially 0 == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_rkl_float32_close_to_reference(shape, renormalize):
    logits, ids, lps, mask = make_inputs(shape, vocab=41, k=8, seed=99 + shape[-1])
    loss, grad = loss_and_grad(logits, ids, lps, mask, renormalize)
    ref_loss, ref_grad = ref_rkl(logits, ids, lps, mask, renormalize)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_computed_in_float32():
    logits, ids, lps, mask = make_inputs((2, 3), vocab=30, k=5, seed=3)
    bf16 = logits.to(torch.bfloat16)
    x = bf16.clone().requires_grad_(True)
    loss = rkl(x, ids, lps, mask)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_loss, _ = ref_rkl(bf16.float(), ids, lps, mask, True)  # same (rounded) logits
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


def test_mask_may_be_bool_int_or_float():
    logits, ids, lps, mask = make_inputs((2, 4), vocab=20, k=4, seed=5)
    expected = rkl(logits, ids, lps, mask)
    assert torch.equal(rkl(logits, ids, lps, mask.long()), expected)
    assert torch.equal(rkl(logits, ids, lps, mask.float()), expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-7)])
def test_zero_when_student_matches_teacher_on_support(dtype, tol):
    g = torch.Generator().manual_seed(11)
    n, vocab, k = 6, 50, 6
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    teacher_full = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    lps = teacher_full.gather(-1, ids)
    lps[2, 4:] = NEG_INF  # padded row: agreement on the remaining support
    ids[2, 4:] = -1
    # Outside S: arbitrary (even huge) logits; on S: teacher log-probs plus a row shift.
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 10 + 20
    shift = torch.randn(n, generator=g, dtype=torch.float64) * 5
    for r in range(n):
        for j in range(k):
            if ids[r, j] >= 0:
                logits[r, ids[r, j]] = lps[r, j] + shift[r]
    mask = torch.ones(n, dtype=torch.bool)
    loss, grad = loss_and_grad(logits.to(dtype), ids, lps.to(dtype), mask)
    assert loss.abs().max() <= tol
    assert grad.abs().max() <= 10 * tol  # at the minimum the gradient vanishes too
    # The student's full distribution is far from the teacher's: almost no mass on S.
    student_mass = torch.softmax(logits, -1).gather(-1, ids.clamp(min=0)).mul(ids >= 0).sum(-1)
    assert student_mass.max() < 1e-3


def test_renormalised_loss_never_touches_logits_outside_support():
    logits, ids, lps, mask = make_inputs((3, 5), vocab=40, k=6, seed=21)
    nan_logits = torch.full_like(logits, float("nan"))
    on_support = ids >= 0
    safe = ids.clamp(min=0)
    nan_logits.scatter_(-1, safe, torch.where(on_support, logits.gather(-1, safe), torch.nan))
    # Pads gather id 0, which is not in any support here: it really is NaN.
    assert torch.isnan(nan_logits[..., 0]).all()

    clean_loss, clean_grad = loss_and_grad(logits, ids, lps, mask)
    loss, grad = loss_and_grad(nan_logits, ids, lps, mask)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)

    # The full-vocabulary form does read those logits: the check can fail.
    rows = mask & (ids >= 0).any(-1)
    unnorm = rkl(nan_logits, ids, lps, mask, renormalize=False)
    assert torch.isnan(unnorm[rows]).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("renormalize", [True, False])
def test_masked_and_all_pad_rows_give_exact_zero_and_no_nan(renormalize):
    logits, ids, lps, mask = make_inputs((2, 6), vocab=25, k=5, seed=8)
    # Poison masked rows: inf / NaN logits and NaN teacher log-probs must not leak.
    logits[~mask] = float("inf")
    logits[~mask, ::2] = float("nan")
    lps[~mask] = float("nan")
    all_pad = (ids < 0).all(-1)
    assert all_pad.any() and (~mask).any()

    with torch.autograd.detect_anomaly(check_nan=True):  # no NaN even in intermediates
        loss, grad = loss_and_grad(logits, ids, lps, mask, renormalize)
    dead = ~mask | all_pad
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(loss[dead], torch.zeros_like(loss[dead]))
    assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))
    # Live rows with two or more support entries do carry a loss (a single-entry
    # support renormalises to q~ = p~ = 1: exactly 0 in the renormalised form).
    multi = (ids >= 0).sum(-1) >= 2
    assert (loss[~dead & multi] != 0).all()
    assert (~dead & multi).sum() >= 6


def test_minus_inf_teacher_logprob_counts_as_padding():
    logits, ids, lps, mask = make_inputs((4,), vocab=30, k=6, seed=6)
    mask[:] = True
    zero_prob = lps.clone()
    zero_prob[2:, 1] = NEG_INF  # a real id with teacher probability 0
    padded_ids = ids.clone()
    padded_ids[2:, 1] = -1
    for renormalize in (True, False):
        loss, grad = loss_and_grad(logits, ids, zero_prob, mask, renormalize)
        ref_loss, ref_grad = loss_and_grad(logits, padded_ids, zero_prob, mask, renormalize)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_gradient_is_zero_outside_support():
    logits, ids, lps, mask = make_inputs((4,), vocab=30, k=6, seed=4)
    _, grad = loss_and_grad(logits, ids, lps, mask)
    support = torch.zeros_like(grad, dtype=torch.bool)
    support.scatter_(-1, ids.clamp(min=0), ids >= 0)
    assert torch.equal(grad[~support], torch.zeros_like(grad[~support]))
    # Each row's gradient sums to 0: shifting all logits of a row changes nothing.
    torch.testing.assert_close(grad.sum(-1), torch.zeros(4), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# support_metrics
# ---------------------------------------------------------------------------


def test_support_metrics_hand_computed():
    # One live row, one masked row, one all-pad row. V = 4, K = 2.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25] * 4, [0.25] * 4]))
    ids = torch.tensor([[0, 2], [0, 1], [-1, -1]])
    lps = torch.log(torch.tensor([[0.4, 0.4], [0.5, 0.5], [1.0, 1.0]]))
    lps[2] = NEG_INF
    mask = torch.tensor([True, False, True])
    m = metrics(logits, ids, lps, mask)
    # Live row: q~ = (5/6, 1/6), p~ = (1/2, 1/2).
    rkl = 5 / 6 * math.log(5 / 3) + 1 / 6 * math.log(1 / 3)
    assert m["topk_rkl"] == pytest.approx(rkl, rel=1e-6)
    assert m["teacher_support_mass"] == pytest.approx(0.8, rel=1e-6)
    assert m["student_support_mass"] == pytest.approx(0.6, rel=1e-6)
    assert m["topk_overlap"] == pytest.approx(0.5)  # student top-2 = {0, 1}; teacher {0, 2}
    assert m["num_positions"] == 1.0


def test_support_metrics_agree_with_loss_and_handle_empty():
    logits, ids, lps, mask = make_inputs((2, 5), vocab=30, k=6, seed=13)
    m = metrics(logits, ids, lps, mask)
    rows = mask & (ids >= 0).any(-1)
    assert m["num_positions"] == float(rows.sum())
    loss = rkl(logits, ids, lps, mask)
    assert m["topk_rkl"] == pytest.approx(float(loss[rows].mean()), rel=1e-6)
    assert 0.0 < m["teacher_support_mass"] <= 1.0 and 0.0 < m["student_support_mass"] <= 1.0
    # The student's own top-K as support gives full overlap.
    own = logits.topk(4, dim=-1).indices
    assert metrics(logits, own, torch.full(own.shape, -1.0), mask)["topk_overlap"] == 1.0

    empty = metrics(logits, ids, lps, torch.zeros_like(mask))
    names = {"topk_rkl", "teacher_support_mass", "student_support_mass", "topk_overlap"}
    assert set(empty) >= names
    assert all(v == 0.0 for v in empty.values())


# ---------------------------------------------------------------------------
# special tokens
# ---------------------------------------------------------------------------

BOS, EOS, PAD = 0, 1, 2


def test_special_token_mask_keeps_eos():
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [7, PAD, EOS, 8, 9]])
    got = special_token_mask(tokens, special_ids=[BOS, EOS, PAD], keep_ids=[EOS])
    expected = torch.tensor([[True, False, False, False, True], [False, True, False, False, False]])
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert not special_token_mask(tokens, special_ids=[EOS], keep_ids=[EOS]).any()
    assert torch.equal(special_token_mask(tokens, special_ids={EOS}, keep_ids=()), tokens == EOS)


def test_drop_special_support_pads_special_entries_and_copies():
    ids = torch.tensor([[5, BOS, EOS, 7], [PAD, 9, -1, EOS]])
    lps = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.05], [0.4, 0.3, 1.0, 0.1]]))
    lps[1, 2] = NEG_INF
    new_ids, new_lps = drop_special_support(ids, lps, special_ids=[BOS, EOS, PAD], keep_ids=[EOS])
    assert torch.equal(new_ids, torch.tensor([[5, -1, EOS, 7], [-1, 9, -1, EOS]]))
    dropped = torch.tensor([[False, True, False, False], [True, False, True, False]])
    assert (new_lps[dropped] == NEG_INF).all()
    assert torch.equal(new_lps[~dropped], lps[~dropped])
    assert ids[0, 1] == BOS and lps[0, 1] > NEG_INF  # inputs untouched

    # The loss then renormalises over what is left: same as a support without them.
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, dtype=torch.bool)
    without = rkl(logits, torch.tensor([[5, EOS, 7], [9, EOS, -1]]), new_lps[[[0], [1]], [[0, 2, 3], [1, 3, 2]]], mask)
    got = rkl(logits, new_ids, new_lps, mask)
    torch.testing.assert_close(got, without, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------
# union_support: teacher top-K joined with the student's candidates
# ---------------------------------------------------------------------------


def union_inputs(seed: int, shape=(3, 5), vocab=37, k=6, m=5):
    """make_inputs plus the student's top-M ids (some in the teacher's support, some repeated,
    some padded) and the teacher's log-probabilities of them, from the same full teacher rows."""
    g = torch.Generator().manual_seed(seed)
    logits, ids, lps, mask = make_inputs(shape, vocab, k, seed, dtype=torch.float64)
    n = math.prod(shape)
    teacher_full = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0, -1)
    flat_ids, flat_lps = ids.reshape(n, k), lps.reshape(n, k)
    flat_lps.copy_(torch.where(flat_ids >= 0, teacher_full.gather(-1, flat_ids.clamp(min=0)), NEG_INF).float())
    candidates = logits.reshape(n, vocab).topk(m, dim=-1).indices
    candidates[0, 1] = candidates[0, 0]  # a repeat
    candidates[2, -1] = -1  # a pad
    candidates[3, 0] = flat_ids[3, 0]  # one the teacher's support has
    candidate_lps = torch.where(candidates >= 0, teacher_full.gather(-1, candidates.clamp(min=0)), NEG_INF)
    candidate_lps[4, 2] = NEG_INF  # the teacher cannot write it
    return logits, ids, lps, mask, candidates.reshape(*shape, m), candidate_lps.float().reshape(*shape, m)


def ref_union_row(teacher_ids, teacher_lps, candidate_ids, candidate_lps):
    """The union as a dict id -> teacher log-prob, the teacher's top-K entries first."""
    union = {}
    for v, lp in list(zip(teacher_ids, teacher_lps)) + list(zip(candidate_ids, candidate_lps)):
        if v >= 0 and lp != NEG_INF and v not in union:
            union[v] = lp
    return union


def test_union_support_loss_and_gradient_match_a_float64_reference():
    logits, ids, lps, mask, candidates, candidate_lps = union_inputs(seed=3)
    union_ids, union_lps = union_support(ids, lps, candidates, candidate_lps)
    assert union_ids.shape == (*mask.shape, ids.shape[-1] + candidates.shape[-1])
    loss, grad = loss_and_grad(logits, union_ids, union_lps, mask)
    vocab = logits.shape[-1]
    rows = zip(
        logits.reshape(-1, vocab).tolist(),
        ids.reshape(-1, ids.shape[-1]).tolist(),
        lps.double().reshape(-1, ids.shape[-1]).tolist(),
        candidates.reshape(-1, candidates.shape[-1]).tolist(),
        candidate_lps.double().reshape(-1, candidates.shape[-1]).tolist(),
        mask.reshape(-1).tolist(),
    )
    ref_loss, ref_grad, grew = [], [], 0
    for z, t_ids, t_lps, c_ids, c_lps, keep in rows:
        union = ref_union_row(t_ids, t_lps, c_ids, c_lps)
        grew += len(union) > len(ref_union_row(t_ids, t_lps, [], []))
        row_loss, row_grad = ref_rkl_row(z, list(union), list(union.values()), True) if keep else (0.0, [0.0] * vocab)
        ref_loss.append(row_loss)
        ref_grad.append(row_grad)
    assert grew >= 10  # the candidates do widen most supports
    torch.testing.assert_close(
        loss, torch.tensor(ref_loss, dtype=torch.float64).reshape(mask.shape), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        grad, torch.tensor(ref_grad, dtype=torch.float64).reshape(logits.shape), rtol=1e-10, atol=1e-12
    )


def test_union_support_without_new_candidates_is_the_teacher_support():
    logits, ids, lps, mask, candidates, candidate_lps = union_inputs(seed=4)
    padded = torch.full_like(candidates, -1)
    union_ids, union_lps = union_support(ids, lps, padded, candidate_lps)
    torch.testing.assert_close(
        rkl(logits, union_ids, union_lps, mask), rkl(logits, ids, lps, mask), rtol=1e-12, atol=1e-15
    )
    # Candidates all inside the teacher's support add nothing either.
    union_ids, _ = union_support(ids, lps, ids, lps)
    assert (union_ids[..., ids.shape[-1] :] == -1).all()


def test_union_support_pushes_down_student_mass_the_teacher_support_misses():
    """A student candidate outside the teacher's top-K, which the teacher finds unlikely, gets a
    positive gradient (its logit goes down) only with the union."""
    logits = torch.tensor([[4.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    ids, lps = torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.4]]))
    candidates, candidate_lps = torch.tensor([[0]]), torch.log(torch.tensor([[0.001]]))
    mask = torch.ones(1, dtype=torch.bool)
    _, alone = loss_and_grad(logits, ids, lps, mask)
    union_ids, union_lps = union_support(ids, lps, candidates, candidate_lps)
    _, joined = loss_and_grad(logits, union_ids, union_lps, mask)
    assert alone[0, 0] == 0 and joined[0, 0] > 0.1
