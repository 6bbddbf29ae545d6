"""A checkpoint whose tokenizer and lm head disagree still serves (sessions.TeacherVocabulary).

Real checkpoints disagree both ways: a tokenizer with an added token the head has no row for,
and a head padded past the tokenizer (rows no token owns). The first made every OpenSession
fail with INTERNAL; the padded rows must never be offered as support.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import TeacherScores
from teacher_server.engines import EngineConfig, ScoringJob
from teacher_server.engines.hf import HFEngine
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import TINY_VOCAB, build_tiny_model
from tests.helpers import EXCLUDED, score_request, teacher_tokenizer_message

TOKENS = np.array([1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 2], dtype=np.int32)


def serve(model, caplog):
    with caplog.at_level(logging.INFO, logger="teacher_server.teachers"):
        server = LiveServer(server_config(model))
    head = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher 'default': tokenizer")]
    return server, head


def open_session(stub, tokenizer: teacher_pb2.StudentTokenizer) -> teacher_pb2.OpenSessionResponse:
    return stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=tokenizer), timeout=30)


def test_a_tokenizer_longer_than_the_head_opens_sessions_and_scores(tmp_path, caplog):
    model = build_tiny_model(tmp_path / "long-tokenizer", extra_special_tokens=("<|tool|>",))
    server, head = serve(model, caplog)
    try:
        assert head == [
            f"teacher 'default': tokenizer ({TINY_VOCAB + 1} tokens) and lm head ({TINY_VOCAB} rows) disagree: 1 token id(s) "
            f"beyond the head are never scored or offered ('<|tool|>'={TINY_VOCAB}); 0 row(s) no token owns are "
            "never offered as support"
        ]
        with grpc.insecure_channel(server.target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            same = open_session(stub, teacher_pb2.StudentTokenizer(same_as_teacher=True))
            message = teacher_tokenizer_message(model)
            message.special_tokens.append("<|tool|>")
            explicit = open_session(stub, teacher_pb2.StudentTokenizer(hf=message))
            assert same.same_as_teacher and explicit.same_as_teacher
            assert same.student_vocab_size == TINY_VOCAB
            scores = TeacherScores.from_proto(stub.Score(score_request(same.session_id, TOKENS, 2, 8), timeout=30))
            assert scores.mask.all() and (scores.ids < TINY_VOCAB).all() and np.isfinite(scores.token_logprobs).all()
            with pytest.raises(grpc.RpcError) as error:
                stub.Score(score_request(same.session_id, np.append(TOKENS, TINY_VOCAB), 2, 8), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"token id {TINY_VOCAB} is outside the session's vocabulary" in error.value.details()
    finally:
        server.stop()


def test_a_padded_head_never_offers_its_unowned_rows(tmp_path, caplog):
    rows = TINY_VOCAB + 32
    model = build_tiny_model(tmp_path / "padded-head", head_rows=rows)
    server, head = serve(model, caplog)
    try:
        assert head == [
            f"teacher 'default': tokenizer ({TINY_VOCAB} tokens) and lm head ({rows} rows) disagree: 0 token id(s) beyond the "
            "head are never scored or offered; 32 row(s) no token owns are never offered as support"
        ]
        with grpc.insecure_channel(server.target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            opened = open_session(stub, teacher_pb2.StudentTokenizer(same_as_teacher=True))
            assert opened.student_vocab_size == rows
            got = TeacherScores.from_proto(stub.Score(score_request(opened.session_id, TOKENS, 2, 16), timeout=30))
    finally:
        server.stop()
    # The random padded rows rank high (the head is scaled up): the support is the top K of the rest.
    engine = HFEngine(EngineConfig(model=str(model), chunk_size=16))
    excluded = np.union1d(EXCLUDED, np.arange(TINY_VOCAB, rows))
    everything = engine.score([ScoringJob(token_ids=TOKENS, score_from=2, top_k=16)])[0]
    assert (everything.ids >= TINY_VOCAB).any()
    expected = engine.score([ScoringJob(token_ids=TOKENS, score_from=2, top_k=16, exclude_ids=excluded)])[0]
    assert (got.ids < TINY_VOCAB).all() and got.mask.all()
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.token_logprobs, expected.token_logprobs, rtol=0, atol=1e-5)
