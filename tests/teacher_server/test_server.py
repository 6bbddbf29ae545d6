"""The teacher service over real gRPC on 127.0.0.1: protocol, results, errors, concurrency, cancellation, retries."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import teacher_server
from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import AsyncTeacherClient, RetryPolicy, TeacherClient, TeacherScores
from teacher_server.engines import EngineConfig, ScoringJob
from teacher_server.engines.hf import HFEngine
from teacher_server.launch import free_port
from tests.conftest import SPECIAL_TOKEN, TINY_VOCAB, LiveServer, server_config
from tests.helpers import (
    EOS,
    EXCLUDED,
    THINK,
    check_against_reference,
    reference,
    score_request,
    teacher_tokenizer_message,
)

MAX_K = 32  # server_config's default


# ---------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def channel(live_server):
    with grpc.insecure_channel(live_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> teacher_pb2_grpc.TeacherStub:
    return teacher_pb2_grpc.TeacherStub(channel)


@pytest.fixture(scope="module")
def session_id(stub) -> str:
    return open_same_as_teacher(stub)


@pytest.fixture(scope="module")
def engine(tiny_model) -> HFEngine:
    """An in-process engine on the same model, for comparison with the service."""
    return HFEngine(EngineConfig(model=str(tiny_model), chunk_size=16))


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64).eval()


def open_same_as_teacher(stub, temperature: float = 0.0) -> str:
    request = teacher_pb2.OpenSessionRequest(
        tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True), temperature=temperature
    )
    return stub.OpenSession(request, timeout=30).session_id


def make_rollouts(count: int, seed: int) -> list[tuple[np.ndarray, int, int]]:
    """(tokens, score_from, top_k) triples of varied lengths, prompts and K; ids avoid the specials."""
    rng = np.random.default_rng(seed)
    rollouts = []
    for _ in range(count):
        length = int(rng.integers(6, 90))
        tokens = rng.integers(4, TINY_VOCAB, size=length).astype(np.int32)
        rollouts.append((tokens, int(rng.integers(1, length)), int(rng.integers(1, MAX_K + 1))))
    return rollouts


def assert_same_scores(got: TeacherScores, expected: TeacherScores) -> None:
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.mask, expected.mask)
    np.testing.assert_array_equal(got.reason, expected.reason)
    atol = 1e-5  # batched with other requests, float32 sums may differ in the last bits
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=atol)
    np.testing.assert_allclose(got.token_logprobs, expected.token_logprobs, rtol=0, atol=atol)


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------- info and sessions


def test_get_info(stub, tiny_model):
    info = stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30)
    assert info.model == str(tiny_model)
    assert info.engine == "hf"
    assert info.vocab_size == TINY_VOCAB
    assert info.max_k == MAX_K
    assert info.max_sequence_length == 256  # the tiny model's max_position_embeddings
    assert info.dtype == "float32"
    assert set(info.special_token_ids) == {0, 1, EOS, THINK}
    assert list(info.eos_token_ids) == [EOS]
    assert info.server_version == teacher_server.__version__


def test_same_as_teacher_session_id_is_stable(stub):
    first = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True)), timeout=30
    )
    second = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True)), timeout=30
    )
    assert first.session_id and first.session_id == second.session_id
    assert first.same_as_teacher and first.student_vocab_size == TINY_VOCAB
    # Temperature 0 means 1.0: the same settings, the same id; another temperature, another session.
    assert open_same_as_teacher(stub, temperature=1.0) == first.session_id
    assert open_same_as_teacher(stub, temperature=2.0) != first.session_id


def other_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[EOS]"] + [f"tok{i}" for i in range(48)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer.to_str()


def test_teacher_tokenizer_sent_explicitly_scores_bit_for_bit_like_same_as_teacher(stub, session_id, tiny_model):
    opened = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(
            tokenizer=teacher_pb2.StudentTokenizer(hf=teacher_tokenizer_message(tiny_model))
        ),
        timeout=30,
    )
    assert opened.same_as_teacher
    assert opened.student_vocab_size == TINY_VOCAB
    tokens = np.array([1, 10, 20, 30, THINK, 40, 50, EOS, 60, 70, 80, 90, 5], dtype=np.int32)
    explicit = stub.Score(score_request(opened.session_id, tokens, 2, 16, request_id=7), timeout=30)
    implicit = stub.Score(score_request(session_id, tokens, 2, 16, request_id=7), timeout=30)
    assert explicit.SerializeToString(deterministic=True) == implicit.SerializeToString(deterministic=True)


def test_different_tokenizer_opens_but_scoring_fails_precondition(stub):
    opened = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(
            tokenizer=teacher_pb2.StudentTokenizer(
                hf=teacher_pb2.HFTokenizer(tokenizer_json=other_tokenizer_json(), eos_tokens=["[EOS]"])
            )
        ),
        timeout=30,
    )
    assert not opened.same_as_teacher
    assert opened.student_vocab_size == 50
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(score_request(opened.session_id, [1, 2, 3, 4], 1, 4), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tokenizer" in caught.value.details() and "same_as_teacher" in caught.value.details()


@pytest.mark.parametrize(
    "tokenizer, needles",
    [
        (teacher_pb2.HFTokenizer(tokenizer_json="this is not json"), ["tokenizer_json"]),
        (teacher_pb2.HFTokenizer(tokenizer_json=json.dumps({"model": {"type": "Nope"}})), ["tokenizer_json"]),
        (teacher_pb2.HFTokenizer(tokenizer_json=""), ["tokenizer_json"]),
        (teacher_pb2.HFTokenizer(tokenizer_json=other_tokenizer_json(), eos_tokens=["</s>"]), ["</s>"]),
    ],
    ids=["not-json", "bad-model", "empty", "eos-not-in-vocab"],
)
def test_bad_tokenizer_is_invalid_argument(stub, tokenizer, needles):
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(
            teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=tokenizer)), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in needles:
        assert needle in caught.value.details()


@pytest.mark.parametrize(
    "tokenizer",
    [
        teacher_pb2.StudentTokenizer(),
        teacher_pb2.StudentTokenizer(
            same_as_teacher=True, hf=teacher_pb2.HFTokenizer(tokenizer_json=other_tokenizer_json())
        ),
    ],
    ids=["neither", "both"],
)
def test_open_session_needs_exactly_one_tokenizer_field(stub, tokenizer):
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=tokenizer), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "same_as_teacher" in caught.value.details() and "hf" in caught.value.details()


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_bad_temperature_is_invalid_argument(stub, temperature):
    with pytest.raises(grpc.RpcError) as caught:
        open_same_as_teacher(stub, temperature=temperature)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in caught.value.details()


@pytest.mark.parametrize(
    "options, needle",
    [
        (teacher_pb2.AlignmentOptions(candidates=5000), "candidates must be in [0, 1024], got 5000"),
        (teacher_pb2.AlignmentOptions(candidates=-1), "candidates"),
        (teacher_pb2.AlignmentOptions(inside_candidates=2000), "inside_candidates must be in [0, 1024], got 2000"),
        (teacher_pb2.AlignmentOptions(expansion_rounds=100), "expansion_rounds must be at most 8, got 100"),
        (teacher_pb2.AlignmentOptions(branch_token_factor=1e6), "branch_token_factor must be in [0, 8.0]"),
        (teacher_pb2.AlignmentOptions(min_branch_prob=2.0), "min_branch_prob must be in [0, 1], got 2.0"),
    ],
    ids=["candidates-huge", "candidates-negative", "inside-huge", "rounds-huge", "factor-huge", "prob-above-1"],
)
def test_alignment_options_beyond_their_bounds_are_invalid_argument(stub, options, needle):
    # Each multiplies the work of every request of the session: refused when the session opens.
    request = teacher_pb2.OpenSessionRequest(
        tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True), alignment=options
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details(), caught.value.details()


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


# ---------------------------------------------------------------- health and reflection


def test_health_is_serving(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "opd.v1.Teacher"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_teacher_service(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        reflection.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="opd.v1.Teacher"),
                ]
            ),
            timeout=30,
        )
    )
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"opd.v1.Teacher", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the schema is served too


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
]


@pytest.mark.parametrize("fields, code, needles", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_unary_score(stub, session_id, fields, code, needles):
    request = _request(session_id, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    for needle in needles:
        assert needle in caught.value.details(), f"{needle!r} not in {caught.value.details()!r}"


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


# ---------------------------------------------------------------- client retries


def test_client_retries_until_the_server_is_up_and_reopens_after_a_restart(tiny_model, live_server, caplog):
    port = free_port()
    rollouts = make_rollouts(5, seed=13)
    with grpc.insecure_channel(live_server.target) as channel:
        reference_stub = teacher_pb2_grpc.TeacherStub(channel)
        sid = open_same_as_teacher(reference_stub)
        expected = [
            TeacherScores.from_proto(reference_stub.Score(score_request(sid, tokens, sf, 8), timeout=30))
            for tokens, sf, _ in rollouts
        ]

    client = TeacherClient(f"127.0.0.1:{port}", timeout_s=30, retry=RetryPolicy(attempts=20, max_backoff_s=1.0))
    servers = []
    try:
        with ThreadPoolExecutor(1) as pool:

            def first_call():
                client.open_session()
                return client.score(rollouts[0][0], rollouts[0][1], 8)

            pending = pool.submit(first_call)
            time.sleep(1.0)
            assert not pending.done(), "nothing listens yet: the call must still be retrying"
            servers.append(LiveServer(server_config(tiny_model, port=port)))
            assert_same_scores(pending.result(timeout=60), expected[0])
        session = client.session_id
        assert session == sid  # content-addressed: the same on every server

        # Restart on the same port: the new process knows no sessions.
        servers.pop().stop()
        servers.append(LiveServer(server_config(tiny_model, port=port)))
        assert servers[0].server.port == port
        with pytest.raises(Exception, match="unknown session_id"):
            servers[0].server.servicer.service.sessions.get(session)
        with caplog.at_level(logging.WARNING, logger="student_trainer.client"):
            results = client.score_many([(tokens, sf) for tokens, sf, _ in rollouts], top_k=8)
        assert "lost the session" in caplog.text
        assert servers[0].server.servicer.service.sessions.get(session).session_id == session
        assert client.session_id == session
        for got, want in zip(results, expected):
            assert_same_scores(got, want)
    finally:
        client.close()
        for server in servers:
            server.stop()
