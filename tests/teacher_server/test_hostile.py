"""A shared teacher against its own tenants: the sandbox's limits, hostile tokenizers, budgets,
sizes checked before work (issue 20). Each case is bounded in time and memory on 2 cores;
bench/attacks.py runs the same attacks against a live server with a victim tenant and reports
what each costs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter

import numpy as np
import pytest

from teacher_server.alignment.cross import CrossOptions
from teacher_server.errors import InvalidArgument, ResourceExhausted, TeacherError
from teacher_server.sandbox import Limits, Sandbox, SandboxBusy, SandboxFailure, phase
from teacher_server.sessions import SessionRegistry, SessionSettings, TeacherVocabulary
from teacher_server.student_tokenizer import SandboxedEncoder, StudentTokenizerSpec
from teacher_server.tenancy import SessionOwners
from testkit import hostile
from testkit import tokenizers as T

LIMITS = Limits(cpu_s=20.0, wall_s=60.0, memory_bytes=1 << 30)


# ------------------------------------------------------------- the sandbox (functions run in it)


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes << 20))


HELD = []


def hold(megabytes: int) -> int:
    """Keep `megabytes` of touched memory in the worker (what a library's caches do)."""
    HELD.append(b"x" * (megabytes << 20))
    return os.getpid()


def refuse(message: str) -> None:
    raise InvalidArgument(message)


def panic() -> None:
    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    raise PanicException("range end index 18446744073709551568 out of range")


def spin_in_a_phase() -> None:
    phase("probing", cpu_s=1.0)
    spin(30)


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox("test", LIMITS, max_waiting=4)
    yield box
    box.close()


def test_a_call_past_its_cpu_limit_fails_and_the_next_gets_a_new_worker(sandbox):
    first = sandbox.call(os.getpid)
    started = time.monotonic()
    with pytest.raises(SandboxFailure, match="more than 1 s of CPU time"):
        sandbox.call(spin, 30.0, limits=Limits(cpu_s=1.0, wall_s=30.0, memory_bytes=LIMITS.memory_bytes))
    assert time.monotonic() - started < 10
    assert sandbox.call(os.getpid) not in (first, os.getpid())


def test_a_phase_names_itself_and_tightens_the_cpu_limit(sandbox):
    with pytest.raises(SandboxFailure, match="while probing, it used more than 1 s of CPU time"):
        sandbox.call(spin_in_a_phase)


def test_memory_past_the_limit_fails_with_the_limit_named(sandbox):
    with pytest.raises(SandboxFailure, match="ran out of memory .the limit is 1024 MiB"):
        sandbox.call(allocate, 4096)
    assert sandbox.call(allocate, 16) == 16 << 20


def test_a_worker_that_grew_past_half_its_memory_limit_is_replaced():
    box = Sandbox("grows", Limits(cpu_s=20.0, wall_s=60.0, memory_bytes=1 << 30))
    first = box.call(hold, 100)
    assert box.call(hold, 100) == first  # about 260 MiB resident: below half the limit
    assert box.call(hold, 400) == first  # about 660 MiB now: the worker is replaced after this call
    assert box.call(os.getpid) != first
    box.close()


def test_wall_clock_limit(sandbox):
    started = time.monotonic()
    with pytest.raises(SandboxFailure, match="took longer than 1 s"):
        sandbox.call(time.sleep, 30, limits=Limits(cpu_s=20.0, wall_s=1.0, memory_bytes=LIMITS.memory_bytes))
    assert time.monotonic() - started < 5


def test_domain_errors_pass_through_and_panics_become_failures(sandbox):
    with pytest.raises(InvalidArgument, match="as sent"):
        sandbox.call(refuse, "as sent")
    with pytest.raises(SandboxFailure, match="PanicException: range end index"):
        sandbox.call(panic)
    assert sandbox.call(len, "still serving") == 13


def test_callers_past_the_waiting_limit_are_told_so_at_once():
    import threading

    box = Sandbox("busy", LIMITS, max_waiting=1)
    running = threading.Thread(target=box.call, args=(time.sleep, 3))
    running.start()
    time.sleep(1.5)  # the worker has started and is sleeping
    with pytest.raises(SandboxBusy, match="1 calls are already waiting"):
        box.call(len, "x")
    running.join()
    box.close()


# ------------------------------------------------------------- hostile tokenizers, real teacher


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if T.missing_reason("smollm2"):
        pytest.skip(T.missing_reason("smollm2"))
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    T.load("smollm2").save_pretrained(path)
    sessions = SessionRegistry(TeacherVocabulary.from_pretrained(str(path), 49152))
    yield sessions
    sessions.shutdown()


@pytest.mark.parametrize(
    "name, needle",
    [
        ("retry_limit_regex", "while encoding a probe text with the student's tokenizer, PanicException"),
        ("long_subword_prefix", "while parsing the student's tokenizer.json, PanicException"),
        ("huge_id", "largest id is 40000000"),
        ("empty_vocabulary", "vocabulary is empty"),
    ],
)
def test_hostile_tokenizers_are_refused_quickly_with_the_reason(registry, name, needle):
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as refused:
        registry.open(StudentTokenizerSpec(getattr(hostile, name)()), SessionSettings())
    assert needle in str(refused.value)
    assert time.monotonic() - started < 5


def test_a_backtracking_regex_costs_a_bounded_probe(registry):
    """Slow on runs of its own tokens, but the probe is at most PROBE_CHARS characters."""
    started = time.monotonic()
    registry.open(StudentTokenizerSpec(hostile.backtracking_regex()), SessionSettings())
    assert time.monotonic() - started < 10


def test_a_real_student_opens_and_its_tables_count_against_the_budget(registry):
    if T.missing_reason("gpt2"):
        pytest.skip(T.missing_reason("gpt2"))
    spec = StudentTokenizerSpec(T.load("gpt2").backend_tokenizer.to_str(), eos_tokens=("<|endoftext|>",))
    session = registry.open(spec, SessionSettings())
    assert 5 << 20 < session.table_bytes < 200 << 20
    # No per-token Python objects kept: they would fragment the server's heap (packed_vocab.py),
    # and special-token pairing still finds the student's tokens by string.
    assert _python_objects(session.alignment.tables.student) < 100
    assert session.special_token_pairs == (("<|endoftext|>", "<|im_end|>"),)
    small = SessionRegistry(registry.teacher, max_table_bytes=session.table_bytes - 1)
    small.tokenizers = registry.tokenizers  # the same workers: no second start-up
    with pytest.raises(ResourceExhausted, match="over this teacher's budget"):
        small.open(spec, SessionSettings())
    assert small.table_bytes() == 0


def _python_objects(value) -> int:
    if isinstance(value, np.ndarray):
        return 0
    if isinstance(value, dict):
        return 1 + sum(_python_objects(key) + _python_objects(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return 1 + sum(map(_python_objects, value))
    if dataclasses.is_dataclass(value):
        return 1 + sum(map(_python_objects, vars(value).values()))
    return 1


def test_one_tokenizer_opened_with_other_settings_is_read_once(registry):
    if T.missing_reason("gpt2"):
        pytest.skip(T.missing_reason("gpt2"))
    spec = StudentTokenizerSpec(T.load("gpt2").backend_tokenizer.to_str(), eos_tokens=("<|endoftext|>",))
    before = registry.table_bytes()  # the sessions of the tests above
    first = registry.open(spec, SessionSettings(temperature=0.9))
    held = registry.table_bytes()
    started = time.monotonic()
    second = registry.open(spec, SessionSettings(temperature=0.7, options=CrossOptions(candidates=32)))
    assert time.monotonic() - started < 1.0  # no worker call: the reading of the first is shared
    assert second.session_id != first.session_id
    assert second.alignment.tables.student is first.alignment.tables.student
    assert registry.table_bytes() == held  # counted once
    registry.close(first.session_id)
    registry.close(second.session_id)
    assert registry.table_bytes() == before


def test_a_tokenizer_over_the_size_limit_is_refused_before_any_work(registry):
    text = " " * (registry.tokenizers.limits.max_chars + 1)
    with pytest.raises(InvalidArgument, match="over this teacher's limit"):
        registry.open(StudentTokenizerSpec(text), SessionSettings())


def test_an_encoder_that_fails_while_scoring_refuses_its_session_from_then_on():
    box = Sandbox("encodes", LIMITS)
    encoder = SandboxedEncoder(box, hostile.long_subword_prefix(), key="long-subword-prefix")
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="failed while this session was scoring .*PanicException"):
            encoder(["ab"])
    box.close()


# ------------------------------------------------------------- budgets and costs, before work


def test_tenant_caps_are_checked_before_building():
    owners = SessionOwners(max_sessions_per_tenant=2, max_tenant_table_bytes=100)
    owners.grant("a", "s1", 60)
    owners.admit("a", "s2")  # one more session may come, its size not known yet
    with pytest.raises(ResourceExhausted, match="160 MiB|would hold"):
        owners.grant("a", "s2", 100)
    owners.grant("a", "s2", 30)
    with pytest.raises(ResourceExhausted, match="2 open sessions"):
        owners.admit("a", "s3")
    owners.admit("a", "s1")  # one it holds: re-opening it costs nothing
    owners.admit("b", "s3")
    assert owners.release("a", "s1") and owners.release("a", "s2")
    owners.grant("a", "s3", 100)  # released sessions no longer count


def test_alignment_options_scale_the_work_a_request_may_ask_for():
    assert CrossOptions().relative_work() == 1.0
    largest = CrossOptions.requested(candidates=1024, inside_candidates=1024, rounds=8, branch_token_factor=8.0)
    assert largest.relative_work() == 36.0


def fuzz_registry() -> SessionRegistry:
    """Sessions against a small byte-level BPE teacher: valid mutants are built in milliseconds."""
    text = hostile.small_byte_level_bpe()
    vocab = json.loads(text)["model"]["vocab"]
    teacher = TeacherVocabulary(
        vocab=vocab, special_ids=frozenset(), eos_ids=frozenset(), model_vocab_size=len(vocab), tokenizer_json=text
    )
    return SessionRegistry(teacher)


def open_statuses(registry: SessionRegistry, texts) -> Counter:
    """The status of opening each tokenizer (OK or the error's code)."""
    codes = Counter()
    for text in texts:
        try:
            registry.open(StudentTokenizerSpec(text), SessionSettings())
            codes["OK"] += 1
        except TeacherError as error:
            codes[error.code.name] += 1
    return codes


def test_mutated_tokenizers_get_documented_statuses_only():
    """bench/attacks.py --fuzz runs 10,000 of them; here 600, every status a documented one."""
    registry = fuzz_registry()
    codes = open_statuses(registry, hostile.mutated_tokenizers(600, seed=1))
    registry.shutdown()
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}, codes
    assert codes["OK"] > 20 and codes["INVALID_ARGUMENT"] > 100, codes


# ------------------------------------------------------------- calls and messages past the gRPC limits


KEYS = {"a": "key-of-tenant-a-0123456789", "b": "key-of-tenant-b-0123456789"}


@pytest.fixture(scope="module")
def busy_server(tiny_model):
    from teacher_server.auth import ApiKeys
    from tests.conftest import LiveServer, server_config

    keys = ApiKeys.parse("\n".join(f"{tenant} {key}" for tenant, key in KEYS.items()))
    server = LiveServer(server_config(tiny_model, api_keys=keys, max_calls=12, max_tenant_calls=8))
    yield server
    server.stop()


def score_request(session_id: str, count: int):
    import numpy as np

    from opd.tensors import to_tensor
    from opd.v1 import teacher_pb2

    tokens = np.arange(count, dtype=np.int32) % 40 + 5
    return teacher_pb2.ScoreRequest(session_id=session_id, tokens=to_tensor(tokens), score_from=1, top_k=4)


def test_streams_past_the_call_limits_get_resource_exhausted_on_one_connection(busy_server):
    """gRPC's own bound would end these with INTERNAL (client side) or CANCELLED; the gate answers
    RESOURCE_EXHAUSTED, per tenant first (8 here), then over all tenants (12), and its counts
    return to zero. (The synchronous client: grpcio's asyncio client reports a refused stream as
    INTERNAL when its write races the server's status, grpc/grpc#36066.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from opd.v1 import teacher_pb2_grpc
    from tests.helpers import open_same_as_teacher

    metadata = {tenant: (("authorization", f"Bearer {key}"),) for tenant, key in KEYS.items()}
    channel = grpc.insecure_channel(busy_server.target)  # one connection for every call
    stub = teacher_pb2_grpc.TeacherStub(channel)
    request = score_request(open_same_as_teacher(stub, metadata=metadata["a"]), 12)

    def held_streams(plan: list[tuple[str, int]]) -> list[Counter]:
        """Each tenant's streams in turn, every served one held open until all were tried."""
        released = threading.Event()

        def one(tenant: str) -> tuple[str, str]:
            def requests():
                yield request
                released.wait(60)

            try:
                for _ in stub.ScoreStream(requests(), metadata=metadata[tenant], timeout=60):
                    pass
                return "OK", ""
            except grpc.RpcError as error:
                return error.code().name, error.details()

        with ThreadPoolExecutor(sum(count for _, count in plan)) as pool:
            waves, served = [], 0
            for tenant, count in plan:
                calls = [pool.submit(one, tenant) for _ in range(count)]
                served += (held := min(count, 8, 12 - served))
                while sum(call.done() for call in calls) < count - held:
                    time.sleep(0.05)
                waves.append(calls)
            released.set()
            return [Counter(call.result() for call in calls) for calls in waves]

    tenant_full = ("RESOURCE_EXHAUSTED", "tenant 'a' has 8 calls in progress, its limit; retry shortly")
    server_full = ("RESOURCE_EXHAUSTED", "12 calls are in progress on this teacher, its limit; retry shortly")
    assert held_streams([("a", 20), ("b", 10)]) == [
        {("OK", ""): 8, tenant_full: 12},
        {("OK", ""): 4, server_full: 6},  # with a's eight still held
    ]
    assert held_streams([("b", 8)]) == [{("OK", ""): 8}]  # every slot was given back
    channel.close()


def test_a_message_over_its_methods_limit_is_refused_before_it_is_parsed(busy_server):
    """The receive limit is per method: a Score never needs a tokenizer's room. Bytes that are not
    even a protobuf message get RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: the size came first."""
    import grpc

    from teacher_server.service import receive_limits

    limits = receive_limits(65_536, 32, 64 << 20)  # server_config's max_k
    key = (("authorization", f"Bearer {KEYS['a']}"),)
    with grpc.insecure_channel(busy_server.target) as channel:
        for method, size in (("Score", limits["Score"] + 1), ("GetInfo", limits["GetInfo"] + 1)):
            raw = channel.unary_unary(f"/opd.v1.Teacher/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                raw(b"\xff" * size, metadata=key, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, method
            assert f"{size} bytes, over this teacher's limit of {size - 1} for {method}" in caught.value.details()
        stream = channel.stream_stream("/opd.v1.Teacher/ScoreStream")
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([b"\xff" * (limits["ScoreStream"] + 1)]), metadata=key, timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the stream ends
        assert "over this teacher's limit" in caught.value.details()
        raw = channel.unary_unary("/opd.v1.Teacher/Score")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff" * 100, metadata=key, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # within the limit: parsed, malformed
