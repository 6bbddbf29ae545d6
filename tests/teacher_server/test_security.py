"""Tenants, API keys, TLS and mTLS, teacher pinning, over real gRPC on 127.0.0.1.

Every RPC of the Teacher service refuses a missing, malformed or wrong key; a
tenant never reaches another tenant's session; health and reflection stay open;
TLS and mutual TLS work with certificates made here; no key is ever logged.
"""

from __future__ import annotations

import logging
import secrets
import shutil

import grpc
import numpy as np
import pytest

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import RetryPolicy, TeacherClient, TeacherRequestError, TlsOptions
from teacher_server.auth import ApiKeys, KeyFileError
from teacher_server.identity import weights_sha256
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import build_tiny_model
from tests.teacher_server.certs import make_pki

ALICE_KEY = "alice-" + secrets.token_hex(16)
BOB_KEY = "bob-" + secrets.token_hex(16)
ALICE_SPARE_KEY = "alice2-" + secrets.token_hex(16)  # a tenant may hold several keys (rotation)
WRONG_KEY = "mallory-" + secrets.token_hex(16)
KEYS = [ALICE_KEY, BOB_KEY, ALICE_SPARE_KEY]
TOKENS = np.array([1, 10, 20, 30, 40, 50, 2], dtype=np.int32)


def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(f"# tenant key\nalice {ALICE_KEY}\n\nbob\t{BOB_KEY}\nalice {ALICE_SPARE_KEY}\n")
    return path


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tmp_path_factory):
    server = LiveServer(server_config(tiny_model, api_keys=ApiKeys.load(key_file(tmp_path_factory))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(keyed_server):
    with grpc.insecure_channel(keyed_server.target) as channel:
        yield teacher_pb2_grpc.TeacherStub(channel)


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def open_session(stub, key: str, temperature: float = 1.0) -> str:
    request = teacher_pb2.OpenSessionRequest(
        tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True), temperature=temperature
    )
    return stub.OpenSession(request, metadata=auth(key), timeout=30).session_id


def score_request(session_id: str, request_id: int = 1) -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(
        request_id=request_id, session_id=session_id, tokens=to_tensor(TOKENS), score_from=2, top_k=4
    )


def call_every_rpc(stub, metadata, session_id: str) -> dict[str, grpc.StatusCode]:
    """The status of each Teacher RPC made with `metadata`."""

    def status(call) -> grpc.StatusCode:
        try:
            result = call()
            if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
                list(result)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    open_request = teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True))
    close_request = teacher_pb2.CloseSessionRequest(session_id=session_id)
    return {
        "GetInfo": status(lambda: stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=metadata, timeout=30)),
        "OpenSession": status(lambda: stub.OpenSession(open_request, metadata=metadata, timeout=30)),
        "Score": status(lambda: stub.Score(score_request(session_id), metadata=metadata, timeout=30)),
        "ScoreStream": status(
            lambda: stub.ScoreStream(iter([score_request(session_id)]), metadata=metadata, timeout=30)
        ),
        "CloseSession": status(lambda: stub.CloseSession(close_request, metadata=metadata, timeout=30)),
    }


BAD_CREDENTIALS = {
    "no-metadata": None,
    "wrong-key": auth(WRONG_KEY),
    "empty-bearer": [("authorization", "Bearer ")],
    "basic-scheme": [("authorization", f"Basic {ALICE_KEY}")],
    "key-without-scheme": [("authorization", ALICE_KEY)],
    "other-header": [("x-api-key", ALICE_KEY)],
}


@pytest.mark.parametrize("metadata", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_every_rpc_refuses_calls_without_a_valid_key(stub, metadata):
    session_id = open_session(stub, ALICE_KEY)
    codes = call_every_rpc(stub, metadata, session_id)
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    # Nothing happened: alice's session is still there.
    assert stub.Score(score_request(session_id), metadata=auth(ALICE_KEY), timeout=30).ids.shape == [5, 4]


def test_unauthenticated_message_says_what_to_send(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30)
    assert "authorization: Bearer" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=auth(WRONG_KEY), timeout=30)
    assert "invalid API key" in caught.value.details() and WRONG_KEY not in caught.value.details()


def test_error_messages_are_bounded_whatever_the_request_quotes(stub):
    # A message quoting 100 KB of the request would exceed gRPC's 16 KiB metadata limit and
    # reach the client as RESOURCE_EXHAUSTED instead of the real error.
    request = score_request("s-" + "x" * 100_000)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, metadata=auth(ALICE_KEY), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert details.startswith("unknown session_id 's-xxxx") and len(details) <= 1024
    assert "characters in all" in details and details.endswith("(the same tokenizer gives the same id)")


def test_valid_keys_work_for_every_rpc(stub):
    for key in KEYS:
        session_id = open_session(stub, key, temperature=1.5)
        assert set(call_every_rpc(stub, auth(key), session_id).values()) == {grpc.StatusCode.OK}


def test_a_tenant_cannot_use_or_close_another_tenants_session(stub):
    # Distinct settings, so the id is alice's alone for now.
    alice_session = open_session(stub, ALICE_KEY, temperature=0.7)
    codes = call_every_rpc(stub, auth(BOB_KEY), alice_session)
    # GetInfo and OpenSession are bob's own business; every use of alice's session is NOT_FOUND,
    # with the very message of an unknown id: bob cannot even tell that it exists.
    ok, not_found = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND
    assert codes == {"GetInfo": ok, "OpenSession": ok, "Score": not_found, "ScoreStream": ok, "CloseSession": not_found}
    reply = next(stub.ScoreStream(iter([score_request(alice_session, 7)]), metadata=auth(BOB_KEY), timeout=30))
    assert reply.WhichOneof("result") == "error" and reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Score(score_request("s-does-not-exist"), metadata=auth(BOB_KEY), timeout=30)
    with pytest.raises(grpc.RpcError) as foreign:
        stub.Score(score_request(alice_session), metadata=auth(BOB_KEY), timeout=30)
    assert foreign.value.details() == unknown.value.details().replace("s-does-not-exist", alice_session)
    # alice still uses it; her other key is the same tenant.
    assert stub.Score(score_request(alice_session), metadata=auth(ALICE_KEY), timeout=30).ids.shape == [5, 4]
    assert stub.Score(score_request(alice_session), metadata=auth(ALICE_SPARE_KEY), timeout=30).ids.shape == [5, 4]


def test_a_shared_session_survives_until_its_last_tenant_closes_it(stub):
    alice_session = open_session(stub, ALICE_KEY, temperature=0.9)
    assert open_session(stub, BOB_KEY, temperature=0.9) == alice_session  # content-addressed: shared tables
    stub.CloseSession(teacher_pb2.CloseSessionRequest(session_id=alice_session), metadata=auth(BOB_KEY), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(score_request(alice_session), metadata=auth(BOB_KEY), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Score(score_request(alice_session), metadata=auth(ALICE_KEY), timeout=30).ids.shape == [5, 4]
    stub.CloseSession(teacher_pb2.CloseSessionRequest(session_id=alice_session), metadata=auth(ALICE_KEY), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(score_request(alice_session), metadata=auth(ALICE_KEY), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_stay_open(keyed_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(keyed_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listing = next(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
            )
        )
        assert "opd.v1.Teacher" in {service.name for service in listing.list_services_response.service}


def test_client_sends_its_key(keyed_server):
    with TeacherClient(keyed_server.target, api_key=BOB_KEY, timeout_s=30) as client:
        client.open_session()
        assert client.score(TOKENS, 2, 4).ids.shape == (5, 4)
    with TeacherClient(keyed_server.target, api_key=WRONG_KEY, timeout_s=30) as client:
        with pytest.raises(TeacherRequestError) as caught:
            client.open_session()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "no keys"),
        ("alice\n", "line 1: expected two fields"),
        (f"alice {ALICE_KEY} extra\n", "line 1: expected two fields"),
        ("alice short\n", "shorter than 16"),
        (f"al ice {ALICE_KEY}\n", "expected two fields"),
        (f"bad/name {ALICE_KEY}\n", "tenant name"),
        (f"alice {ALICE_KEY}\nbob {ALICE_KEY}\n", "line 2: this key is already listed"),
    ],
)
def test_key_file_errors_name_the_line_never_the_key(text, needle):
    with pytest.raises(KeyFileError, match=needle) as caught:
        ApiKeys.parse(text)
    assert ALICE_KEY not in str(caught.value) and "short" not in str(caught.value).replace("shorter", "")


def test_no_key_is_ever_logged(tiny_model, tmp_path_factory, caplog):
    with caplog.at_level(logging.DEBUG):
        server = LiveServer(server_config(tiny_model, api_keys=ApiKeys.load(key_file(tmp_path_factory))))
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = teacher_pb2_grpc.TeacherStub(channel)
                session_id = open_session(stub, ALICE_KEY)
                for metadata in [*BAD_CREDENTIALS.values(), auth(ALICE_KEY), auth(BOB_KEY)]:
                    call_every_rpc(stub, metadata, session_id)
        finally:
            server.stop()
    assert "refused" in caplog.text  # auth failures are logged...
    for key in [*KEYS, WRONG_KEY]:
        assert key not in caplog.text  # ...without any key


def test_open_server_warns_once_at_start_up(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="teacher_server"):
        server = LiveServer(server_config(tiny_model))
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = teacher_pb2_grpc.TeacherStub(channel)
                for _ in range(3):
                    call_every_rpc(stub, None, open_session(stub, "unused"))
        finally:
            server.stop()
    warnings = [r for r in caplog.records if "NO AUTHENTICATION" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "--api-keys" in warnings[0].getMessage()


def test_keyed_server_does_not_warn(tiny_model, tmp_path_factory, caplog):
    with caplog.at_level(logging.INFO, logger="teacher_server"):
        LiveServer(server_config(tiny_model, api_keys=ApiKeys.load(key_file(tmp_path_factory)))).stop()
    assert "NO AUTHENTICATION" not in caplog.text
    assert "2 tenant(s): alice, bob" in caplog.text


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def insecure_status(target: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=auth(ALICE_KEY), timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


def tls_client(target, tls, key=ALICE_KEY) -> TeacherClient:
    return TeacherClient(target, api_key=key, tls=tls, timeout_s=5, retry=RetryPolicy(attempts=1))


def test_tls_with_api_keys(tiny_model, tmp_path_factory, pki):
    config = server_config(
        tiny_model,
        api_keys=ApiKeys.load(key_file(tmp_path_factory)),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
    )
    server = LiveServer(config)
    try:
        with tls_client(server.target, TlsOptions(root_certificates=str(pki.ca))) as client:
            client.open_session()
            assert client.score(TOKENS, 2, 4).ids.shape == (5, 4)
        # The name in the certificate is checked: localhost is in it, "teacher.example" is not.
        with tls_client(f"localhost:{server.server.port}", TlsOptions(root_certificates=str(pki.ca))) as client:
            assert client.get_info().vocab_size > 0
        wrong_name = TlsOptions(root_certificates=str(pki.ca), server_name="teacher.example")
        with tls_client(server.target, wrong_name) as client:
            with pytest.raises(TeacherRequestError) as caught:
                client.get_info()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        # A CA that did not sign the server's certificate, and plaintext, both fail.
        with tls_client(server.target, TlsOptions(root_certificates=str(pki.other_ca))) as client:
            with pytest.raises(TeacherRequestError) as caught:
                client.get_info()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert insecure_status(server.target) == grpc.StatusCode.UNAVAILABLE
        # TLS does not replace the key.
        with tls_client(server.target, TlsOptions(root_certificates=str(pki.ca)), key=WRONG_KEY) as client:
            with pytest.raises(TeacherRequestError) as caught:
                client.get_info()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_mutual_tls(tiny_model, pki):
    config = server_config(
        tiny_model, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    server = LiveServer(config)
    try:
        with_cert = TlsOptions(
            root_certificates=str(pki.ca), certificate_chain=str(pki.client_cert), private_key=str(pki.client_key)
        )
        with tls_client(server.target, with_cert) as client:
            client.open_session()
            assert client.score(TOKENS, 2, 4).ids.shape == (5, 4)
        rogue = TlsOptions(
            root_certificates=str(pki.ca),
            certificate_chain=str(pki.rogue_client_cert),
            private_key=str(pki.rogue_client_key),
        )
        for options in (TlsOptions(root_certificates=str(pki.ca)), rogue):
            with tls_client(server.target, options) as client:
                with pytest.raises(TeacherRequestError) as caught:
                    client.get_info()
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert insecure_status(server.target) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


# ---------------------------------------------------------------- pinning the teacher


def test_a_pinned_client_refuses_a_swapped_teacher(tiny_model, tmp_path_factory):
    from teacher_server.launch import free_port

    other_model = build_tiny_model(tmp_path_factory.mktemp("other-teacher"), seed=5)
    teacher = tmp_path_factory.mktemp("deployed") / "teacher"  # what the operator serves
    shutil.copytree(tiny_model, teacher)
    port = free_port()
    server = LiveServer(server_config(teacher, port=port))
    client = TeacherClient(
        f"127.0.0.1:{port}", timeout_s=30, pin_teacher=True, retry=RetryPolicy(attempts=40, max_backoff_s=0.5)
    )
    try:
        info = client.get_info()
        assert info.weights_sha256 == weights_sha256(str(tiny_model)) and len(info.weights_sha256) == 64
        assert client.pin == f"{teacher}@{info.weights_sha256}"
        client.open_session()
        before = client.score(TOKENS, 2, 4)
        # The same weights again after a restart: fine, the session is re-opened transparently.
        server.stop()
        server = LiveServer(server_config(teacher, port=port))
        np.testing.assert_array_equal(client.score(TOKENS, 2, 4).ids, before.ids)
        # Other weights under the same model path: refused, on every call but GetInfo.
        server.stop()
        shutil.rmtree(teacher)
        shutil.copytree(other_model, teacher)
        server = LiveServer(server_config(teacher, port=port))
        with pytest.raises(TeacherRequestError) as caught:
            client.score(TOKENS, 2, 4)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "swapped" in caught.value.message
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            pinned = [("opd-teacher-pin", client.pin)]
            assert stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=pinned, timeout=30).weights_sha256
            codes = {code for name, code in call_every_rpc(stub, pinned, "s-x").items() if name != "GetInfo"}
            assert codes == {grpc.StatusCode.FAILED_PRECONDITION}
    finally:
        client.close()
        server.stop()


def test_refused_requests_leave_no_reference_cycles(keyed_server, stub):
    """A refused call must be freed when it ends, not at the next full garbage collection.

    context.abort() and re-raised stream failures used to tie each refused call's state,
    exception and frames into a cycle: a server under a scan grew with its error rate
    (the fuzz test's RSS bound caught it). The server runs in this process, so its
    leftovers show up in a collection here.
    """
    import gc
    from pathlib import Path

    import teacher_server
    from teacher_server.errors import TeacherError

    package = str(Path(teacher_server.__file__).parent)

    session_id = open_session(stub, ALICE_KEY)
    bad_tokens = teacher_pb2.ScoreRequest(session_id=session_id, tokens=teacher_pb2.Tensor(dtype="int32", shape=[3]))
    raw_stream = keyed_server_raw_stream(keyed_server.target)
    gc.collect()
    for _ in range(20):
        for call in (
            lambda: stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=auth(WRONG_KEY), timeout=30),
            lambda: stub.Score(bad_tokens, metadata=auth(ALICE_KEY), timeout=30),
            lambda: list(stub.ScoreStream(iter([bad_tokens]), metadata=auth(WRONG_KEY), timeout=30)),
            lambda: raw_stream(b"\xff\xff not a protobuf message"),
        ):
            with pytest.raises(grpc.RpcError):
                call()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        server_frames = [
            f"{g.f_code.co_filename}:{g.f_code.co_name}"
            for g in gc.garbage
            if type(g).__name__ == "frame" and g.f_code.co_filename.startswith(package)
        ]
        errors = [type(g).__name__ for g in gc.garbage if isinstance(g, (TeacherError, grpc.aio.AbortError))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert server_frames == [] and errors == [], (server_frames[:5], errors[:5])


def keyed_server_raw_stream(target: str):
    """A ScoreStream call that sends raw bytes as its one request (the server cannot parse it)."""
    channel = grpc.insecure_channel(target)
    call = channel.stream_stream("/opd.v1.Teacher/ScoreStream", request_serializer=None, response_deserializer=None)
    return lambda data: list(call(iter([data]), metadata=auth(ALICE_KEY), timeout=30))
