"""The servicer over real gRPC: invalid input gets a clear status (alone, inside a stream), and
concurrent unary, streaming and async clients get their own answers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import AsyncTeacherClient, TeacherScores
from teacher_server.engines import ScoringJob
from testkit.tiny_model import TINY_VOCAB
from tests.helpers import (
    MAX_K,
    assert_same_scores,
    make_rollouts,
    EXCLUDED,
    score_request,
)


# ---------------------------------------------------------------- invalid input


def _tokens_tensor(dtype: str, shape, data: bytes) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def _request(default_session_id, **fields):
    base = dict(
        session_id=default_session_id,
        tokens=to_tensor(np.array([5, 6, 7, 8], dtype=np.int32)),
        score_from=1,
        top_k=4,
    )
    base.update(fields)
    return teacher_pb2.ScoreRequest(**base)


LONG = 257  # GetInfo.max_sequence_length + 1

# (id, request fields, code, substrings the message must contain). "SESSION" is filled in.
INVALID = [
    ("unknown-session", dict(session_id="s-doesnotexist"), "NOT_FOUND", ["s-doesnotexist", "OpenSession"]),
    ("negative-id", dict(tokens=to_tensor(np.array([5, -1, 7], np.int32))), "INVALID_ARGUMENT", ["-1", "vocabulary"]),
    ("id-too-large", dict(tokens=to_tensor(np.array([5, 96, 7], np.int32))), "INVALID_ARGUMENT", ["96", "[0, 96)"]),
    ("empty", dict(tokens=to_tensor(np.zeros(0, np.int32))), "INVALID_ARGUMENT", ["empty"]),
    (
        "too-long",
        dict(tokens=to_tensor(np.full(LONG, 5, np.int32))),
        "INVALID_ARGUMENT",
        [str(LONG), "256"],
    ),
    ("score-from-0", dict(score_from=0), "INVALID_ARGUMENT", ["score_from", "got 0"]),
    ("score-from-len", dict(score_from=4), "INVALID_ARGUMENT", ["score_from", "got 4", "= 4"]),
    ("score-from-beyond", dict(score_from=9), "INVALID_ARGUMENT", ["score_from", "got 9"]),
    ("score-from-negative", dict(score_from=-2), "INVALID_ARGUMENT", ["score_from", "got -2"]),
    ("k-0", dict(top_k=0), "INVALID_ARGUMENT", ["top_k", "got 0", "32"]),
    ("k-negative", dict(top_k=-3), "INVALID_ARGUMENT", ["top_k", "got -3"]),
    ("k-above-max", dict(top_k=MAX_K + 1), "INVALID_ARGUMENT", ["top_k", f"got {MAX_K + 1}", "max_k"]),
    (
        "float32-tokens",
        dict(tokens=to_tensor(np.array([5, 6, 7], np.float32))),
        "INVALID_ARGUMENT",
        ["tokens", "float32", "int32"],
    ),
    (
        "2d-tokens",
        dict(tokens=to_tensor(np.array([[5, 6], [7, 8]], np.int32))),
        "INVALID_ARGUMENT",
        ["tokens", "dimension", "[2, 2]"],
    ),
    (
        "data-length-mismatch",
        dict(tokens=_tokens_tensor("int32", [4], b"\x05\x00\x00\x00" * 3)),
        "INVALID_ARGUMENT",
        ["tokens", "16 bytes", "data has 12"],
    ),
    (
        "negative-dim",
        dict(tokens=_tokens_tensor("int32", [-4], b"")),
        "INVALID_ARGUMENT",
        ["tokens", "negative", "[-4]"],
    ),
    ("unknown-dtype", dict(tokens=_tokens_tensor("int31", [1], b"\x05\x00\x00\x00")), "INVALID_ARGUMENT", ["int31"]),
    (
        "candidates-1d",
        dict(candidate_ids=to_tensor(np.array([5, 6, 7], np.int32))),
        "INVALID_ARGUMENT",
        ["candidate_ids", "2 dimension"],
    ),
    (
        "candidates-rows",
        dict(candidate_ids=to_tensor(np.zeros((2, 3), np.int32))),
        "INVALID_ARGUMENT",
        ["positions = 3", "[2, 3]"],
    ),
    (
        "candidates-too-many",
        dict(candidate_ids=to_tensor(np.zeros((3, MAX_K + 1), np.int32))),
        "INVALID_ARGUMENT",
        [f"at most {MAX_K}", f"[3, {MAX_K + 1}]"],
    ),
    (
        "score-mask-rows",
        dict(score_mask=to_tensor(np.ones(2, np.uint8))),
        "INVALID_ARGUMENT",
        ["score_mask", "[3]", "[2]"],
    ),
    ("score-mask-values", dict(score_mask=to_tensor(np.array([1, 2, 0], np.uint8))), "INVALID_ARGUMENT", ["1", "0"]),
    ("score-mask-zeros", dict(score_mask=to_tensor(np.zeros(3, np.uint8))), "INVALID_ARGUMENT", ["0 everywhere"]),
    (
        "score-mask-first",
        dict(score_mask=to_tensor(np.array([0, 1, 1], np.uint8))),
        "INVALID_ARGUMENT",
        ["score_mask[0]", "score_from"],
    ),
    (
        "score-mask-dtype",
        dict(score_mask=to_tensor(np.ones(3, np.int32))),
        "INVALID_ARGUMENT",
        ["score_mask", "int32", "uint8"],
    ),
    (
        "candidate-beyond-vocab",
        dict(candidate_ids=to_tensor(np.array([[5], [96], [-1]], np.int32))),
        "INVALID_ARGUMENT",
        ["96", "[0, 96)"],
    ),
]


@pytest.mark.parametrize("fields, code, needles", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_unary_score(stub, session_id, fields, code, needles):
    request = _request(session_id, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    for needle in needles:
        assert needle in caught.value.details(), f"{needle!r} not in {caught.value.details()!r}"


def test_candidate_logprobs_equal_a_float64_forward(live_server, session_id, reference_model):
    """The teacher's log-probability of every candidate at every position, over its full vocabulary
    whatever its top-K, through the real server and the trainer's client; pads read -inf."""
    from tests.helpers import TOL, reference

    rng = np.random.default_rng(5)
    rollouts = make_rollouts(6, seed=11)

    async def main():
        client = AsyncTeacherClient(live_server.target, timeout_s=60)
        try:
            await client.open_session()
            scored = []
            for tokens, score_from, top_k in rollouts:
                candidates = rng.integers(0, TINY_VOCAB, (len(tokens) - score_from, 8)).astype(np.int32)
                candidates[:, -1] = -1
                unary = await client.score(tokens, score_from, top_k, candidate_ids=candidates)
                (streamed,) = await client.score_many([(tokens, score_from, (), candidates)], top_k)
                scored.append((tokens, score_from, candidates, unary, streamed))
            return scored
        finally:
            await client.close()

    for tokens, score_from, candidates, unary, streamed in asyncio.run(main()):
        expected = reference(reference_model, np.asarray(tokens), score_from)
        rows = np.arange(len(candidates))[:, None]
        want = np.where(candidates >= 0, expected[rows, candidates.clip(min=0)], -np.inf)
        for got in (unary.candidate_logprobs, streamed.candidate_logprobs):
            assert got.shape == candidates.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_context_positions_come_back_masked_and_the_rest_unchanged(stub, session_id):
    """score_mask 0 (a tool's output, an observation): masked CONTEXT, no support, counted; the
    student's own positions get what they get without the mask (the teacher still reads the context)."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(4, TINY_VOCAB, size=40).astype(np.int32)
    score_mask = np.ones(35, np.uint8)
    score_mask[8:20] = 0  # an observation between two turns of the student
    request = dict(session_id=session_id, tokens=to_tensor(tokens), score_from=5, top_k=8)
    plain = stub.Score(teacher_pb2.ScoreRequest(**request), timeout=30)
    masked = stub.Score(teacher_pb2.ScoreRequest(**request, score_mask=to_tensor(score_mask)), timeout=30)
    own, context = score_mask == 1, score_mask == 0
    a, b = TeacherScores.from_proto(plain), TeacherScores.from_proto(masked)
    np.testing.assert_array_equal(b.ids[own], a.ids[own])
    np.testing.assert_allclose(b.logprobs[own], a.logprobs[own], atol=1e-5)
    np.testing.assert_allclose(b.token_logprobs[own], a.token_logprobs[own], atol=1e-5)
    assert (b.mask[context] == 0).all() and (b.reason[context] == teacher_pb2.MASK_REASON_CONTEXT).all()
    assert (b.ids[context] == -1).all() and np.isneginf(b.logprobs[context]).all()
    assert masked.counts.context == 12 and masked.counts.with_distribution == plain.counts.with_distribution - 12


def test_missing_tokens_field_is_invalid_argument(stub, session_id):
    request = teacher_pb2.ScoreRequest(session_id=session_id, score_from=1, top_k=4)  # tokens unset
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens" in caught.value.details() and "int32" in caught.value.details()


def test_invalid_requests_in_a_stream_fail_alone(stub, session_id):
    good = make_rollouts(6, seed=3)
    expected = {
        i: TeacherScores.from_proto(stub.Score(score_request(session_id, *rollout), timeout=30))
        for i, rollout in enumerate(good)
    }
    requests, bad_cases, good_ids = [], {}, {}
    next_id = 1000
    for i, (name, fields, code, needles) in enumerate(INVALID):
        requests.append(_request(session_id, request_id=next_id, **fields))
        bad_cases[next_id] = (name, code, needles)
        next_id += 1
        if i < len(good):
            requests.append(score_request(session_id, *good[i], request_id=next_id))
            good_ids[next_id] = i
            next_id += 1
    replies = list(stub.ScoreStream(iter(requests), timeout=60))
    by_id = {reply.request_id: reply for reply in replies}
    assert len(by_id) == len(replies) == len(requests)
    for request_id, (name, code, needles) in bad_cases.items():
        reply = by_id[request_id]
        assert reply.WhichOneof("result") == "error", name
        assert reply.error.code == getattr(grpc.StatusCode, code).value[0], (name, reply.error.message)
        for needle in needles:
            assert needle in reply.error.message, (name, needle, reply.error.message)
    for request_id, index in good_ids.items():
        reply = by_id[request_id]
        assert reply.WhichOneof("result") == "response"
        assert reply.response.request_id == request_id
        assert_same_scores(TeacherScores.from_proto(reply.response), expected[index])


def test_server_still_answers_normally_after_errors(stub, session_id, engine):
    tokens = np.arange(4, 60, dtype=np.int32)
    got = TeacherScores.from_proto(stub.Score(score_request(session_id, tokens, 9, 8), timeout=30))
    (local,) = engine.score([ScoringJob(token_ids=tokens, score_from=9, top_k=8, exclude_ids=EXCLUDED)])
    np.testing.assert_array_equal(got.ids, local.ids)
    np.testing.assert_array_equal(got.logprobs, local.logprobs)
    assert stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30).vocab_size == TINY_VOCAB


# ---------------------------------------------------------------- concurrency


def test_concurrent_requests_from_several_clients_are_matched(live_server, stub, session_id):
    rollouts = make_rollouts(48, seed=5)
    singles = [
        TeacherScores.from_proto(stub.Score(score_request(session_id, *rollout), timeout=30)) for rollout in rollouts
    ]
    unary_part, stream_part, async_part = rollouts[:16], rollouts[16:32], rollouts[32:]
    start = threading.Barrier(3)
    stats = live_server.server.scheduler.stats
    jobs_before, batches_before = stats.jobs_scored, stats.batches

    def unary_client():
        with grpc.insecure_channel(live_server.target) as channel:
            own = teacher_pb2_grpc.TeacherStub(channel)
            own.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30)  # connect first
            start.wait()
            futures = [
                own.Score.future(score_request(session_id, *rollout, request_id=i), timeout=60)
                for i, rollout in enumerate(unary_part)
            ]
            return [TeacherScores.from_proto(future.result()) for future in futures]

    def stream_client():
        # Request ids unrelated to order: the answers are matched by id, not by position.
        ids = [(7919 * (i + 1)) % 100_003 for i in range(len(stream_part))]
        with grpc.insecure_channel(live_server.target) as channel:
            own = teacher_pb2_grpc.TeacherStub(channel)
            own.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30)
            start.wait()
            requests = [score_request(session_id, *rollout, request_id=rid) for rid, rollout in zip(ids, stream_part)]
            replies = list(own.ScoreStream(iter(requests), timeout=60))
        assert sorted(reply.request_id for reply in replies) == sorted(ids)
        by_id = {reply.request_id: reply for reply in replies}
        assert all(by_id[rid].WhichOneof("result") == "response" for rid in ids)
        return [TeacherScores.from_proto(by_id[rid].response) for rid in ids], [r.request_id for r in replies]

    def async_client():
        async def main():
            client = AsyncTeacherClient(live_server.target, timeout_s=60)
            try:
                await client.open_session()
                start.wait()
                many = client.score_many([(tokens, sf) for tokens, sf, _ in async_part[:8]], top_k=MAX_K)
                ones = [client.score(tokens, sf, k) for tokens, sf, k in async_part[8:]]
                return await asyncio.gather(many, *ones)
            finally:
                await client.close()

        many, *ones = asyncio.run(main())
        return many, ones

    with ThreadPoolExecutor(3) as pool:
        unary = pool.submit(unary_client)
        stream = pool.submit(stream_client)
        asynchronous = pool.submit(async_client)
        unary_results = unary.result(timeout=120)
        stream_results, stream_order = stream.result(timeout=120)
        many, ones = asynchronous.result(timeout=120)
    jobs, batches = stats.jobs_scored - jobs_before, stats.batches - batches_before
    # All 48 went through the engine, and concurrent requests were batched together.
    assert jobs == 48
    assert batches < jobs

    for got, expected in zip(unary_results, singles[:16]):
        assert_same_scores(got, expected)
    for got, expected in zip(stream_results, singles[16:32]):
        assert_same_scores(got, expected)
    for got, expected in zip(ones, singles[40:]):
        assert_same_scores(got, expected)
    # score_many asked for MAX_K for all; compare with single answers at that K.
    for got, (tokens, sf, _) in zip(many, async_part[:8]):
        expected = TeacherScores.from_proto(stub.Score(score_request(session_id, tokens, sf, MAX_K), timeout=30))
        assert_same_scores(got, expected)
