"""OpenSession over real gRPC: stable ids, tokenizers sent or implied, temperatures, option bounds."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

import teacher_server
from opd.v1 import teacher_pb2
from testkit.tiny_model import TINY_VOCAB
from tests.helpers import (
    MAX_K,
    open_same_as_teacher,
    EOS,
    THINK,
    score_request,
    teacher_tokenizer_message,
)


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


def test_a_tokenizer_opened_by_many_at_once_is_built_once(stub, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from teacher_server.sessions import SessionRegistry

    builds = []
    original = SessionRegistry._build

    def slow_build(self, *args):
        builds.append(args[0])
        time.sleep(0.5)  # every caller arrives while the first build runs
        return original(self, *args)

    monkeypatch.setattr(SessionRegistry, "_build", slow_build)
    json_text = other_tokenizer_json().replace("tok47", "fresh47")  # not opened by any other test
    request = teacher_pb2.OpenSessionRequest(
        tokenizer=teacher_pb2.StudentTokenizer(hf=teacher_pb2.HFTokenizer(tokenizer_json=json_text)),
    )
    with ThreadPoolExecutor(6) as pool:
        opened = list(pool.map(lambda _: stub.OpenSession(request, timeout=30), range(6)))
    assert len({reply.session_id for reply in opened}) == 1
    assert builds == [opened[0].session_id]


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
