"""HFEngine against a float64 reference: full forward, log_softmax over the whole vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_server.engines import EngineConfig, ScoringJob
from teacher_server.engines.base import Branch
from teacher_server.engines.hf import HFEngine

from testkit.tiny_model import TINY_VOCAB
from tests.helpers import TOL, check_against_reference, reference

CHUNK = 16


@pytest.fixture(scope="module")
def engine(tiny_model) -> HFEngine:
    return HFEngine(EngineConfig(model=str(tiny_model), chunk_size=CHUNK))


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def rollouts() -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [rng.integers(0, TINY_VOCAB, size=n).astype(np.int32) for n in (100, 37, 2, 64, 97, 5, 120)]


def test_long_sequences_are_scored_in_chunks_and_match_reference(engine, reference_model, rollouts):
    tokens = rollouts[0]  # 100 tokens, 99 scored positions = 7 chunks of <= 16 rows
    job = ScoringJob(token_ids=tokens, score_from=1, top_k=8)
    assert job.num_positions > 6 * CHUNK
    (scores,) = engine.score([job])
    check_against_reference(scores, job, reference(reference_model, tokens, 1))


def test_mixed_batch_in_one_call_matches_reference_per_sequence(engine, reference_model, rollouts):
    score_froms = [1, 10, 1, 63, 40, 3, 77]  # includes score_from > 1 and score_from = N - 1
    top_ks = [8, 5, 1, 12, 8, 3, 16]
    jobs = [
        ScoringJob(token_ids=tokens, score_from=start, top_k=k)
        for tokens, start, k in zip(rollouts, score_froms, top_ks)
    ]
    results = engine.score(jobs)  # ONE forward over the right-padded batch
    assert len(results) == len(jobs)
    for job, scores in zip(jobs, results):
        # The reference runs each sequence alone, unpadded.
        check_against_reference(scores, job, reference(reference_model, job.token_ids, job.score_from))


def test_right_padding_does_not_change_results(engine, rollouts):
    jobs = [ScoringJob(token_ids=tokens, score_from=max(1, len(tokens) // 3), top_k=8) for tokens in rollouts]
    batched = engine.score(jobs)
    for job, in_batch in zip(jobs, batched):
        (alone,) = engine.score([job])
        np.testing.assert_array_equal(in_batch.ids, alone.ids)
        np.testing.assert_allclose(in_batch.logprobs, alone.logprobs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(in_batch.token_logprobs, alone.token_logprobs, rtol=0, atol=1e-5)


def test_score_from_rows_are_the_tail_of_a_full_scoring(engine, rollouts):
    tokens = rollouts[4]
    (full,) = engine.score([ScoringJob(token_ids=tokens, score_from=1, top_k=8)])
    for start in (2, 17, 50, len(tokens) - 1):
        (tail,) = engine.score([ScoringJob(token_ids=tokens, score_from=start, top_k=8)])
        assert tail.ids.shape == (len(tokens) - start, 8)
        np.testing.assert_array_equal(tail.ids, full.ids[start - 1 :])
        np.testing.assert_allclose(tail.logprobs, full.logprobs[start - 1 :], rtol=0, atol=1e-5)
        np.testing.assert_allclose(tail.token_logprobs, full.token_logprobs[start - 1 :], rtol=0, atol=1e-5)


def test_excluded_ids_leave_the_support_but_stay_in_the_normaliser(engine, reference_model, rollouts):
    tokens = rollouts[1].copy()
    score_from = 4
    ref = reference(reference_model, tokens, score_from)
    # Exclude the special token and the reference's favourite of the first rows, so that
    # real mass goes missing; also make some targets excluded ids.
    exclude = np.unique(np.r_[3, ref[:3].argmax(axis=1)]).astype(np.int64)
    tokens[score_from + 5] = exclude[-1]
    tokens[score_from + 6] = 3
    ref = reference(reference_model, tokens, score_from)
    job = ScoringJob(token_ids=tokens, score_from=score_from, top_k=10, exclude_ids=exclude)
    (scores,) = engine.score([job])
    check_against_reference(scores, job, ref)
    assert not np.isin(scores.ids, exclude).any()
    # The targets that are excluded from the support still get their true log-probability.
    for t in (score_from + 5, score_from + 6):
        p = t - score_from
        assert abs(scores.token_logprobs[p] - ref[p, tokens[t]]) <= TOL
    # Where the reference's top token was excluded, the support starts below it: no renormalisation.
    for p in range(3):
        assert scores.logprobs[p, 0] < ref[p].max() - 1e-3
        assert abs(scores.logprobs[p, 0] - np.sort(ref[p, np.setdiff1d(np.arange(TINY_VOCAB), exclude)])[-1]) <= TOL


def test_k_beyond_the_allowed_vocabulary_pads_and_support_mass_is_what_is_left(engine, reference_model, rollouts):
    tokens = rollouts[5]
    exclude = np.array([0, 3, 7], dtype=np.int64)
    ref = reference(reference_model, tokens, 1)
    for top_k in (TINY_VOCAB - 3, TINY_VOCAB, TINY_VOCAB + 4):
        job = ScoringJob(token_ids=tokens, score_from=1, top_k=top_k, exclude_ids=exclude)
        (scores,) = engine.score([job])
        check_against_reference(scores, job, ref)
        valid = TINY_VOCAB - len(exclude)
        assert (scores.ids[:, :valid] >= 0).all()
        assert (scores.ids[:, valid:] == -1).all() and scores.ids.shape[1] - valid == top_k - valid
        assert np.isneginf(scores.logprobs[:, valid:]).all()
        # The whole allowed vocabulary is returned: its mass is 1 minus the excluded ids' mass.
        mass = np.exp(scores.logprobs[:, :valid].astype(np.float64)).sum(axis=1)
        np.testing.assert_allclose(mass, 1.0 - np.exp(ref[:, exclude]).sum(axis=1), rtol=0, atol=1e-4)
        assert (mass < 1.0 - 1e-6).all()


def test_k_beyond_vocabulary_without_exclusions_returns_everything(engine, reference_model, rollouts):
    tokens = rollouts[5]
    job = ScoringJob(token_ids=tokens, score_from=2, top_k=TINY_VOCAB + 1)
    (scores,) = engine.score([job])
    check_against_reference(scores, job, reference(reference_model, tokens, 2))
    assert (np.sort(scores.ids[:, :TINY_VOCAB], axis=1) == np.arange(TINY_VOCAB)).all()
    np.testing.assert_allclose(np.exp(scores.logprobs[:, :TINY_VOCAB].astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)


def test_temperature_two_is_log_softmax_of_half_the_logits(engine, reference_model, rollouts):
    tokens = rollouts[3]
    hot = ScoringJob(token_ids=tokens, score_from=5, top_k=8, temperature=2.0)
    cold = ScoringJob(token_ids=tokens, score_from=5, top_k=8)
    hot_scores, cold_scores = engine.score([hot, cold])  # per-job temperature within one batch
    ref_hot = reference(reference_model, tokens, 5, temperature=2.0)
    check_against_reference(hot_scores, hot, ref_hot)
    check_against_reference(cold_scores, cold, reference(reference_model, tokens, 5))
    # A real difference, not a tolerance artefact: T=2 flattens the distribution.
    assert (hot_scores.logprobs[:, 0] < cold_scores.logprobs[:, 0] - 1e-2).all()
    assert np.abs(ref_hot - reference(reference_model, tokens, 5)).max() > 0.1


class RowRecorder(torch.nn.Module):
    """Stands in for the lm head and records how many rows each call gets."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.rows: list[int] = []
        self.weight = head.weight  # the engine reads the vocabulary size from it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        assert hidden.dim() == 2, f"lm head called on a {tuple(hidden.shape)} tensor, not [rows, hidden]"
        self.rows.append(hidden.shape[0])
        return self.head(hidden)


def test_lm_head_never_sees_more_than_chunk_size_rows(engine, reference_model, rollouts, monkeypatch):
    jobs = [
        ScoringJob(token_ids=rollouts[6], score_from=1, top_k=8),  # 119 positions
        ScoringJob(token_ids=rollouts[0], score_from=30, top_k=8),  # 70 positions
        ScoringJob(token_ids=rollouts[2], score_from=1, top_k=8),  # 1 position
    ]
    expected = engine.score(jobs)
    recorder = RowRecorder(engine.lm_head)
    monkeypatch.setattr(engine, "lm_head", recorder)
    recorded = engine.score(jobs)
    assert recorder.rows, "the lm head was not called through engine.lm_head"
    assert max(recorder.rows) <= CHUNK
    # Only the scored positions go through the head (no [T, V] for the prompt either).
    assert sum(recorder.rows) == sum(job.num_positions for job in jobs)
    assert len(recorder.rows) == sum(-(-job.num_positions // CHUNK) for job in jobs)
    for before, after in zip(expected, recorded):
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_array_equal(before.logprobs, after.logprobs)

    # And the backbone never produced logits itself: the full model's forward is not used.
    def full_forward(*args, **kwargs):
        raise AssertionError("the engine ran the full model forward, which builds [T, V] logits")

    monkeypatch.setattr(engine.model, "forward", full_forward)
    (again,) = engine.score(jobs[:1])
    np.testing.assert_array_equal(again.ids, expected[0].ids)


def test_rows_left_out_get_no_head_work_and_the_others_their_own_values(engine, rollouts, monkeypatch):
    """ScoringJob.rows (context positions of a multi-turn rollout): only the wanted rows go through
    the lm head; they equal the full scoring's, the others are empty. Plain batches and shared-prefix groups."""
    rng = np.random.default_rng(8)
    shared = rng.integers(4, TINY_VOCAB, size=130)  # >= hf.SHARED_PREFIX_MIN: a group on one prefix pass
    sequences = [
        rollouts[6],
        rollouts[0],
        *(np.concatenate([shared, rng.integers(4, TINY_VOCAB, size=12)]) for _ in range(2)),
    ]
    full, partial = [], []
    for tokens in sequences:
        requested = rng.integers(0, TINY_VOCAB, size=(len(tokens) - 1, 3))
        rows = rng.random(len(tokens) - 1) < 0.4
        full.append(ScoringJob(tokens.astype(np.int32), 1, 8, requested_ids=requested))
        partial.append(ScoringJob(tokens.astype(np.int32), 1, 8, requested_ids=requested, rows=rows))
    expected = engine.score(full)
    recorder = RowRecorder(engine.lm_head)
    monkeypatch.setattr(engine, "lm_head", recorder)
    got = engine.score(partial)
    assert sum(recorder.rows) == sum(int(job.rows.sum()) for job in partial)
    for job, want, have in zip(partial, expected, got):
        np.testing.assert_array_equal(have.ids[job.rows], want.ids[job.rows])
        np.testing.assert_allclose(
            have.logprobs[job.rows], want.logprobs[job.rows], atol=1e-5
        )  # other matmul shapes: float32 rounding
        np.testing.assert_allclose(have.token_logprobs[job.rows], want.token_logprobs[job.rows], atol=1e-5)
        np.testing.assert_allclose(have.requested_logprobs[job.rows], want.requested_logprobs[job.rows], atol=1e-5)
        assert (have.ids[~job.rows] == -1).all() and np.isneginf(have.logprobs[~job.rows]).all()
        assert (have.token_logprobs[~job.rows] == 0).all() and np.isneginf(have.requested_logprobs[~job.rows]).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_requested_ids_get_their_exact_logprobs_excluded_ones_too(engine, reference_model, rollouts, temperature):
    """ScoringJob.requested_ids: every row's ids, from the same normalised logits as the top-K, whether
    excluded from the support or not; -1 pads read -inf. Plain batches and shared-prefix groups."""
    rng = np.random.default_rng(5)
    shared = rng.integers(4, TINY_VOCAB, size=130)  # >= hf.SHARED_PREFIX_MIN: a group on one prefix pass
    sequences = [*rollouts[:4], *(np.concatenate([shared, rng.integers(4, TINY_VOCAB, size=9)]) for _ in range(2))]
    jobs = []
    for tokens in sequences:
        requested = rng.integers(0, TINY_VOCAB, size=(len(tokens) - 1, 6))
        requested[::3, -2:] = -1  # rows that ask for fewer ids
        requested[:, 0] = 3  # an excluded special token
        exclude = np.array([0, 1, 3])
        job = ScoringJob(tokens.astype(np.int32), 1, 4, temperature, exclude_ids=exclude, requested_ids=requested)
        jobs.append(job)
    for job, scores in zip(jobs, engine.score(jobs)):
        ref = reference(reference_model, job.token_ids, 1, temperature)
        wanted = job.requested_ids
        assert scores.requested_logprobs.shape == wanted.shape and scores.requested_logprobs.dtype == np.float32
        assert np.isneginf(scores.requested_logprobs[wanted < 0]).all()
        expected = np.take_along_axis(ref, np.maximum(wanted, 0), axis=1)
        np.testing.assert_allclose(scores.requested_logprobs[wanted >= 0], expected[wanted >= 0], rtol=0, atol=TOL)
        check_against_reference(scores, job, ref)  # the rest of the answer is unchanged


def test_branches_give_each_tokens_logprob_and_the_row_after_only_where_wanted(
    engine, reference_model, rollouts, monkeypatch
):
    """Branch b continues token_ids[:attach]: the log-probability of each of its tokens, and the
    top-K row after its last token unless it says it needs none (then no head work for it)."""
    tokens = rollouts[0]
    rng = np.random.default_rng(3)
    branches = tuple(
        Branch(int(attach), rng.integers(4, TINY_VOCAB, size=size).astype(np.int32), row_after=bool(index % 2))
        for index, (attach, size) in enumerate([(5, 1), (40, 3), (99, 2), (100, 4), (17, 1)])
    )
    job = ScoringJob(token_ids=tokens, score_from=90, top_k=6, branches=branches)
    recorder = RowRecorder(engine.lm_head)
    monkeypatch.setattr(engine, "lm_head", recorder)
    (scores,) = engine.score([job])
    branch_tokens = sum(len(branch.token_ids) for branch in branches)
    wanted = [index for index, branch in enumerate(branches) if branch.row_after]
    assert sum(recorder.rows) == job.num_positions + branch_tokens + len(wanted)
    assert scores.branch_ids.shape == (len(branches), 6) and scores.branch_token_logprobs.shape == (branch_tokens,)
    start = 0
    for index, branch in enumerate(branches):
        path = np.concatenate([tokens[: branch.attach], branch.token_ids, [0]]).astype(np.int32)
        ref = reference(reference_model, path, branch.attach)  # rows: before each branch token, then after
        size = len(branch.token_ids)
        expected = ref[np.arange(size), branch.token_ids]
        np.testing.assert_allclose(scores.branch_token_logprobs[start : start + size], expected, atol=TOL)
        start += size
        if branch.row_after:
            after = ref[size]
            np.testing.assert_array_equal(scores.branch_ids[index], np.argsort(-after)[:6])
            np.testing.assert_allclose(scores.branch_logprobs[index], np.sort(after)[::-1][:6], atol=TOL)
        else:
            assert (scores.branch_ids[index] == -1).all() and np.isneginf(scores.branch_logprobs[index]).all()


def test_a_float64_teacher_equals_the_float64_reference_to_float32_rounding(tiny_model, reference_model, rollouts):
    """--dtype float64 (an exact reference for checks): the forward and the log-softmax in float64,
    so the only error left is the float32 of the wire."""
    engine = HFEngine(EngineConfig(model=str(tiny_model), chunk_size=CHUNK, dtype="float64"))
    job = ScoringJob(token_ids=rollouts[0], score_from=1, top_k=8, requested_ids=np.tile([4, 9], (99, 1)))
    (scores,) = engine.score([job])
    ref = reference(reference_model, rollouts[0], 1)
    rows = np.arange(job.num_positions)
    np.testing.assert_allclose(scores.token_logprobs, ref[rows, rollouts[0][1:]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores.logprobs, np.take_along_axis(ref, scores.ids.astype(np.int64), 1), rtol=1e-6)
    np.testing.assert_allclose(scores.requested_logprobs, ref[:, [4, 9]], rtol=1e-6, atol=1e-7)
