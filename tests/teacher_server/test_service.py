"""Scoring over real gRPC against the engine and a float64 reference: special tokens, masks and
support; cancelled and expired requests never reach the engine."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import TeacherScores
from teacher_server.engines import ScoringJob
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import SPECIAL_TOKEN, TINY_VOCAB
from tests.helpers import (
    MAX_K,
    make_rollouts,
    open_same_as_teacher,
    wait_until,
    EOS,
    EXCLUDED,
    THINK,
    check_against_reference,
    reference,
    score_request,
)


# ---------------------------------------------------------------- results


def test_service_results_match_engine_and_reference(stub, session_id, engine, reference_model):
    rng = np.random.default_rng(7)
    tokens = rng.integers(4, TINY_VOCAB, size=70).astype(np.int32)
    score_from, top_k = 12, 24
    reply = stub.Score(score_request(session_id, tokens, score_from, top_k, request_id=99), timeout=30)
    assert reply.request_id == 99
    got = TeacherScores.from_proto(reply)
    assert got.ids.shape == (len(tokens) - score_from, top_k)

    job = ScoringJob(token_ids=tokens, score_from=score_from, top_k=top_k, exclude_ids=EXCLUDED)
    (local,) = engine.score([job])
    np.testing.assert_array_equal(got.ids, local.ids)
    np.testing.assert_array_equal(got.logprobs, local.logprobs)
    np.testing.assert_array_equal(got.token_logprobs, local.token_logprobs)
    check_against_reference(local, job, reference(reference_model, tokens, score_from))
    assert (got.mask == 1).all() and (got.reason == teacher_pb2.MASK_REASON_OK).all()
    assert got.coverage == 1.0
    mass = np.exp(got.logprobs.astype(np.float64)).sum(axis=1).mean()
    assert got.mean_support_mass == pytest.approx(mass, abs=1e-6)


def test_same_tokenizer_sessions_honour_eos_and_special_token_pairing(stub):
    """no_eos_pairing masks EOS; a special token paired with itself stays in the loss and the support."""
    tokens = np.array([1, 10, 11, THINK, 12, 13, EOS, 14, THINK, 15, EOS], dtype=np.int32)
    targets = tokens[2:]
    same = teacher_pb2.StudentTokenizer(same_as_teacher=True)

    def scores(**settings) -> tuple[teacher_pb2.OpenSessionResponse, TeacherScores]:
        opened = stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, **settings), timeout=30)
        reply = stub.Score(score_request(opened.session_id, tokens, 2, MAX_K), timeout=30)
        return opened, TeacherScores.from_proto(reply)

    opened, default = scores()
    assert [(p.student_token, p.teacher_token) for p in opened.special_token_pairs] == [("<eos>", "<eos>")]
    np.testing.assert_array_equal(default.mask, (targets != THINK).astype(np.uint8))

    opened, no_eos = scores(no_eos_pairing=True)
    assert list(opened.special_token_pairs) == []
    np.testing.assert_array_equal(no_eos.mask, ~np.isin(targets, [THINK, EOS]))
    assert (no_eos.reason[targets == EOS] == teacher_pb2.MASK_REASON_SPECIAL).all()
    assert not np.isin(no_eos.ids, [EOS, THINK]).any()

    pair = teacher_pb2.SpecialTokenPair(student_token=SPECIAL_TOKEN, teacher_token=SPECIAL_TOKEN)
    opened, think = scores(special_token_pairs=[pair])
    assert (think.mask == 1).all()
    assert np.isin(think.ids, [THINK]).any()  # offered as support again
    np.testing.assert_allclose(think.token_logprobs, default.token_logprobs, atol=1e-6)

    for bad in (
        teacher_pb2.SpecialTokenPair(student_token=SPECIAL_TOKEN, teacher_token="<eos>"),
        teacher_pb2.SpecialTokenPair(student_token="w5", teacher_token="w5"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, special_token_pairs=[bad]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_without_special_token_masking_special_targets_are_scored_and_offered(stub, reference_model):
    """no_special_token_masking (an ablation): every target is in the loss with the teacher's own
    log-probability, and special tokens are part of the top-K like any other token."""
    same = teacher_pb2.StudentTokenizer(same_as_teacher=True)
    request = teacher_pb2.OpenSessionRequest(tokenizer=same, no_special_token_masking=True)
    session = stub.OpenSession(request, timeout=30).session_id
    assert session != stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same), timeout=30).session_id
    tokens = np.array([1, 10, 11, THINK, 12, 13, EOS, 14, THINK, THINK, 15, 0, 16, EOS, 1, 17, EOS], dtype=np.int32)
    got = TeacherScores.from_proto(stub.Score(score_request(session, tokens, 2, MAX_K), timeout=30))
    targets = tokens[2:]
    assert (got.mask == 1).all() and (got.reason == teacher_pb2.MASK_REASON_OK).all()
    ref = reference(reference_model, tokens, 2)
    np.testing.assert_allclose(got.token_logprobs, ref[np.arange(len(targets)), targets], atol=1e-4)
    check_against_reference(got, ScoringJob(token_ids=tokens, score_from=2, top_k=MAX_K), ref)
    # Where the teacher ranks <|think|> within its top K, it is offered.
    rank_of_think = (ref > ref[:, [THINK]]).sum(axis=1)
    assert (got.ids[rank_of_think < MAX_K] == THINK).any(axis=1).all()


def test_special_targets_are_masked_and_never_in_the_support(stub, session_id, reference_model):
    tokens = np.array([1, 10, 11, THINK, 12, 13, EOS, 14, THINK, THINK, 15, 0, 16, EOS, 1, 17, EOS], dtype=np.int32)
    score_from = 2
    got = TeacherScores.from_proto(stub.Score(score_request(session_id, tokens, score_from, MAX_K), timeout=30))
    targets = tokens[score_from:]
    special_target = np.isin(targets, [0, 1, THINK])
    assert special_target.sum() == 5 and (targets == EOS).sum() == 3
    np.testing.assert_array_equal(got.mask, (~special_target).astype(np.uint8))
    np.testing.assert_array_equal(
        got.reason, np.where(special_target, teacher_pb2.MASK_REASON_SPECIAL, teacher_pb2.MASK_REASON_OK)
    )
    assert (got.mask[targets == EOS] == 1).all()
    assert (got.mask[targets == THINK] == 0).all()
    assert not np.isin(got.ids, EXCLUDED).any()
    assert got.coverage == pytest.approx(1 - 5 / len(targets))
    used = got.mask.astype(bool)
    mass = np.exp(got.logprobs[used].astype(np.float64)).sum(axis=1).mean()
    assert got.mean_support_mass == pytest.approx(mass, abs=1e-6)
    # Masked positions still carry the true log-probability of their target.
    ref = reference(reference_model, tokens, score_from)
    np.testing.assert_allclose(got.token_logprobs, ref[np.arange(len(targets)), targets], atol=1e-4)


def test_think_token_is_left_out_of_the_support_where_the_teacher_ranks_it_high(stub, session_id, reference_model):
    rng = np.random.default_rng(11)
    tokens = rng.integers(4, TINY_VOCAB, size=200).astype(np.int32)
    got = TeacherScores.from_proto(stub.Score(score_request(session_id, tokens, 1, MAX_K), timeout=30))
    ref = reference(reference_model, tokens, 1)
    assert not np.isin(got.ids, EXCLUDED).any()
    # Rows where the teacher would put id 3 in its top K: the exclusion really changes the answer there.
    rank_of_think = (ref > ref[:, [THINK]]).sum(axis=1)
    affected = np.flatnonzero(rank_of_think < MAX_K)
    assert len(affected) > 0
    # Every row is the top K of the allowed ids, normalised over the full vocabulary (no renormalisation).
    check_against_reference(got, ScoringJob(token_ids=tokens, score_from=1, top_k=MAX_K, exclude_ids=EXCLUDED), ref)
    mass = np.exp(got.logprobs[affected].astype(np.float64)).sum(axis=1)
    assert (mass <= 1.0 - np.exp(ref[affected][:, EXCLUDED]).sum(axis=1) + 1e-4).all()


# ---------------------------------------------------------------- cancellation and deadlines


class BlockingEngine:
    """Wraps an engine's score: the first batch waits for `release`; records every job it sees."""

    def __init__(self, engine) -> None:
        self.score_inner = engine.score
        self.entered = threading.Event()
        self.release = threading.Event()
        self.jobs_seen: list[ScoringJob] = []

    def __call__(self, jobs):
        self.jobs_seen.extend(jobs)
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60), "test never released the engine"
        return self.score_inner(jobs)


def _queued(scheduler) -> list:
    return scheduler.queued_jobs()


def test_cancelled_and_expired_requests_never_reach_the_engine(tiny_model):
    server = LiveServer(server_config(tiny_model))
    try:
        scheduler = server.server.scheduler
        blocker = BlockingEngine(scheduler.engine)
        scheduler.engine.score = blocker
        with grpc.insecure_channel(server.target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            sid = open_same_as_teacher(stub)
            rollouts = make_rollouts(12, seed=9)

            first = stub.Score.future(score_request(sid, *rollouts[0]), timeout=60)
            assert blocker.entered.wait(30), "the first request never reached the engine"

            kept = [
                stub.Score.future(score_request(sid, *r, request_id=10 + i), timeout=60)
                for i, r in enumerate(rollouts[1:5])
            ]
            cancelled = [stub.Score.future(score_request(sid, *r), timeout=60) for r in rollouts[5:8]]
            stream_open = threading.Event()

            def stream_requests():
                for i, r in enumerate(rollouts[8:11]):
                    yield score_request(sid, *r, request_id=100 + i)
                stream_open.wait(30)  # keep the stream open until it is cancelled

            stream = stub.ScoreStream(stream_requests(), timeout=60)
            wait_until(lambda: len(_queued(scheduler)) == 4 + 3 + 3, what="10 queued jobs")
            expired = stub.Score.future(score_request(sid, *rollouts[11]), timeout=2.0)
            wait_until(lambda: len(_queued(scheduler)) == 4 + 3 + 3 + 1, what="11 queued jobs")
            for future in cancelled:
                assert future.cancel()
            stream.cancel()
            stream_open.set()
            with pytest.raises(grpc.RpcError) as caught:
                expired.result(timeout=30)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            # The server saw every cancellation before the engine is free again.
            wait_until(
                lambda: sum(p.result.cancelled() for p in _queued(scheduler)) == 3 + 3 + 1,
                what="server-side cancellation of 7 queued jobs",
            )
            assert scheduler.stats.jobs_scored == 0 and scheduler.stats.jobs_dropped == 0

            blocker.release.set()
            first.result(timeout=60)
            kept_results = [future.result(timeout=60) for future in kept]
            assert [reply.request_id for reply in kept_results] == [10, 11, 12, 13]
            wait_until(lambda: scheduler.stats.jobs_dropped == 7, what="7 dropped jobs")
            assert scheduler.stats.jobs_scored == 5
            # Exactly the kept jobs reached the engine; none of the cancelled or expired ones did.
            seen = {job.token_ids.tobytes() for job in blocker.jobs_seen}
            assert len(blocker.jobs_seen) == 5
            assert seen == {r[0].tobytes() for r in rollouts[:5]}

            # Still serving.
            again = stub.Score(score_request(sid, *rollouts[5]), timeout=30)
            assert again.ids.shape == [len(rollouts[5][0]) - rollouts[5][1], rollouts[5][2]]
            assert scheduler.stats.jobs_scored == 6
    finally:
        server.stop()
