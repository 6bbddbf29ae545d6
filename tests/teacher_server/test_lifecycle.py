"""Operations: SIGTERM drains without losing an accepted request; Prometheus metrics; JSON logs."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.auth import ApiKeys
from tests.conftest import LiveServer, server_config
from tests.helpers import sigterm_under_load, start_teacher

KEY_A, KEY_B = "a" * 32, "b" * 32


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def score_request(session_id: str, rng: np.random.Generator, request_id: int = 0) -> teacher_pb2.ScoreRequest:
    tokens = rng.integers(4, 96, size=int(rng.integers(20, 60))).astype(np.int32)
    return teacher_pb2.ScoreRequest(
        request_id=request_id, session_id=session_id, tokens=to_tensor(tokens), score_from=4, top_k=8
    )


def open_session(stub, key: str) -> str:
    request = teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True))
    return stub.OpenSession(request, metadata=auth(key), timeout=30).session_id


def test_sigterm_drains_without_losing_an_accepted_request(tiny_model, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"a {KEY_A}\nb {KEY_B}\n")
    # One sequence per forward pass: the queue takes a while to drain, so SIGTERM lands with
    # plenty of accepted work queued and running, and new work keeps arriving during the drain.
    teacher = start_teacher(
        tiny_model, tmp_path, "--api-keys", str(keys), "--max-batch-size", "1", "--log-format", "json"
    )
    process, target = teacher.process, teacher.target
    outcomes: list[tuple[str, str]] = []  # (status name, details) of every request sent
    lock = threading.Lock()
    health_seen: list[int] = []
    stop_sending = threading.Event()
    signalled = threading.Event()

    def record(code: grpc.StatusCode, details: str = "") -> None:
        with lock:
            outcomes.append((code.name, details))

    def unary_client(key: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            session_id = open_session(stub, key)
            deadline = time.monotonic() + 60  # bounded, whatever happens
            while not stop_sending.is_set() and time.monotonic() < deadline:
                futures = [
                    stub.Score.future(score_request(session_id, rng), metadata=auth(key), timeout=60) for _ in range(8)
                ]
                refused = False
                for future in futures:
                    try:
                        future.result()
                        record(grpc.StatusCode.OK)
                    except grpc.RpcError as error:
                        record(error.code(), error.details() or "")
                        refused = True
                if refused:
                    time.sleep(0.05)  # a client backs off
                if signalled.is_set() and process.poll() is not None:
                    break

    def stream_client(key: str) -> None:
        rng = np.random.default_rng(99)
        with grpc.insecure_channel(target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            session_id = open_session(stub, key)
            requests = [score_request(session_id, rng, request_id=i) for i in range(150)]
            try:
                for reply in stub.ScoreStream(iter(requests), metadata=auth(key), timeout=60):
                    if reply.HasField("error"):
                        record(
                            grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == reply.error.code)),
                            reply.error.message,
                        )
                    else:
                        record(grpc.StatusCode.OK)
            except grpc.RpcError as error:  # the stream itself cut: its unanswered requests are lost
                record(error.code(), "stream: " + (error.details() or ""))

    def watch_health() -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while process.poll() is None:
                try:
                    health_seen.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                except grpc.RpcError:
                    break
                time.sleep(0.01)

    try:
        clients = [
            lambda key=key, seed=seed: unary_client(key, seed) for seed, key in enumerate([KEY_A, KEY_A, KEY_B, KEY_B])
        ]
        sigterm_under_load(
            process,
            [*clients, lambda: stream_client(KEY_B)],
            watch_health,
            lambda: sum(code == "OK" for code, _ in outcomes),
            40,
            signalled,
            exited=stop_sending,
        )
    finally:
        teacher.close(timeout_s=60)

    text = teacher.log_path.read_text()
    assert KEY_A not in text and KEY_B not in text
    log = [json.loads(line) for line in text.splitlines() if line.startswith("{")]  # --log-format json
    drained = [entry["message"] for entry in log if entry["message"].startswith("drained:")]
    assert len(drained) == 1, [entry["message"] for entry in log][-10:]
    accepted, scored, dropped = map(int, re.search(r"(\d+) accepted, (\d+) scored, (\d+) dropped", drained[0]).groups())
    codes = {code: sum(1 for c, _ in outcomes if c == code) for code in {c for c, _ in outcomes}}
    refused = [details for code, details in outcomes if code == "UNAVAILABLE"]
    print(
        f"\ndrain: {len(outcomes)} requests sent, statuses {codes}; the teacher accepted {accepted}, "
        f"scored {scored}, dropped {dropped}; health statuses seen {sorted(set(health_seen))}"
    )
    # Every accepted request was scored and its answer arrived: nothing accepted was lost.
    assert dropped == 0 and scored == accepted == codes["OK"]
    # Everything else was refused before it was accepted: UNAVAILABLE while draining, and when
    # the port closes, UNAVAILABLE or CANCELLED for calls racing the close (gRPC's own
    # shutdown); the trainer's client retries both.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, [o for o in outcomes if o[0] != "OK"][:5]
    assert any("draining" in details for details in refused), "no request arrived during the drain"
    assert not any(details.startswith("stream:") for details in refused)
    # Health went NOT_SERVING (2) while the accepted work finished.
    assert 2 in health_seen and health_seen.index(2) > 0 and health_seen[0] == 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """The value of the sample `name{labels...}` (labels in any order, all given ones must match)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(key) == value for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    nearby = "\n".join(line for line in text.splitlines() if name in line)
    raise AssertionError(f"no sample {name}{labels} in\n{nearby}")


def test_prometheus_metrics_per_tenant(tiny_model):
    keys = ApiKeys.parse(f"a {KEY_A}\nb {KEY_B}\n")
    server = LiveServer(server_config(tiny_model, api_keys=keys, metrics_port=0))
    try:
        port = server.server.metrics_port
        # Loopback unless --metrics-host says otherwise: the metrics name tenants.
        assert server.server.metrics._http.server_address[0] == "127.0.0.1"
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(server.target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            for key, count in ((KEY_A, 3), (KEY_B, 5)):
                session_id = open_session(stub, key)
                for _ in range(count):
                    stub.Score(score_request(session_id, rng), metadata=auth(key), timeout=30)
                list(stub.ScoreStream(iter([score_request(session_id, rng, 1)]), metadata=auth(key), timeout=30))
            with pytest.raises(grpc.RpcError):
                stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=auth("x" * 32), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Score(score_request("s-nope", rng), metadata=auth(KEY_A), timeout=30)
        text = scrape(port)
    finally:
        server.stop()
    assert sample(text, "opd_requests_total", tenant="a", method="Score", code="OK") == 3
    assert sample(text, "opd_requests_total", tenant="b", method="Score", code="OK") == 5
    assert sample(text, "opd_requests_total", tenant="b", method="ScoreStream", code="OK") == 1
    assert sample(text, "opd_requests_total", tenant="a", method="Score", code="NOT_FOUND") == 1
    assert sample(text, "opd_request_latency_seconds_count", tenant="b", method="Score") == 5
    assert sample(text, "opd_tokens_scored_total", tenant="a") > 0
    assert sample(text, "opd_alignment_coverage_count", tenant="b") == 6
    assert sample(text, "opd_support_mass_sum", tenant="b") > 0
    assert sample(text, "opd_queue_wait_seconds_count", tenant="a") == 4
    assert sample(text, "opd_queue_depth", tenant="a") == 0
    assert sample(text, "opd_batch_size_count") >= 1 and sample(text, "opd_batch_tokens_sum") > 0
    assert sample(text, "opd_auth_failures_total", reason="invalid") == 1
    assert sample(text, "opd_sessions_open") == 1  # a and b share the same_as_teacher session
    assert sample(text, "opd_teacher_info", model=str(tiny_model)) == 1
    assert sample(text, "opd_draining") == 0
    assert KEY_A not in text and KEY_B not in text


def test_metrics_port_is_off_by_default(live_server):
    assert live_server.server.metrics_port is None
