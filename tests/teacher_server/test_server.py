"""The server process around the service: health, reflection, and a client that retries until it is up."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from opd.v1 import teacher_pb2_grpc
from student_trainer.client import RetryPolicy, TeacherClient, TeacherScores
from teacher_server.launch import free_port
from tests.conftest import LiveServer, server_config
from tests.helpers import (
    assert_same_scores,
    make_rollouts,
    open_same_as_teacher,
    score_request,
)


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
            servers[0].server.teachers.named("").sessions.get(session)
        with caplog.at_level(logging.WARNING, logger="student_trainer.client"):
            results = client.score_many([(tokens, sf) for tokens, sf, _ in rollouts], top_k=8)
        assert "lost the session" in caplog.text
        assert servers[0].server.teachers.named("").sessions.get(session).session_id == session
        assert client.session_id == session
        for got, want in zip(results, expected):
            assert_same_scores(got, want)
    finally:
        client.close()
        for server in servers:
            server.stop()
