"""Bad input: over 10,000 generated malformed or adversarial requests against a live teacher.

Hypothesis draws batches of 20 request recipes (wrong dtypes and shapes, huge
sizes, ids out of range, garbage and mutated tokenizers, odd temperatures, random
bytes in place of a protobuf message, bad keys, unknown methods); each recipe is
sent as drawn and as 4 byte-level mutants of its wire form (flipped, cut,
duplicated or inserted bytes: the classic mutation fuzzer, cheap where Hypothesis
draws are not), so a batch is 100 requests, sent concurrently over four channels,
most as unary calls and some in a ScoreStream. The teacher (a subprocess with API keys and a 1 MiB request limit)
must answer every one with a documented status, never crash or hang (a deadline
of 30 s per call would show a hang as DEADLINE_EXCEEDED), keep serving valid
requests correctly throughout, and its RSS may grow by less than 5% over the
measured requests (after a warm-up of 2,000). RSS is read after every batch and compared
as the median of the first and of the last RSS_WINDOW measured batches: one reading
moves by up to 7% with the requests in flight when it is taken (374-402 MiB within 50
batches of a flat run), while a leak moves the median.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from opd.v1 import teacher_pb2, teacher_pb2_grpc
from tests.helpers import start_teacher

KEY = secrets.token_hex(16)
AUTH = [("authorization", f"Bearer {KEY}")]
RECIPES, MUTANTS = 20, 4  # a batch: 20 drawn requests + 4 mutants of each = 100 requests
WARMUP_BATCHES, MEASURED_BATCHES = 20, 100
RSS_WINDOW = 15  # batches
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,  # an unknown method
}
METHODS = ["GetInfo", "OpenSession", "CloseSession", "Score", "ScoreStream", "NoSuchMethod"]
REQUEST_TYPES = {
    "GetInfo": teacher_pb2.GetInfoRequest,
    "OpenSession": teacher_pb2.OpenSessionRequest,
    "CloseSession": teacher_pb2.CloseSessionRequest,
    "Score": teacher_pb2.ScoreRequest,
}

# ---------------------------------------------------------------- strategies
#
# Strategies are built once, at import: building them inside each draw costs more than
# the draw. Bulk content (token arrays, long strings, random bytes) comes from a drawn
# seed rather than element by element, and the live session id and the teacher's
# tokenizer.json are placeholders filled in when a request is sent (resolve()).

SESSION = "$SESSION"
TOKENIZER = "$TOKENIZER"
seeds = st.integers(0, 2**32 - 1)
unicode = st.characters(blacklist_categories=["Cs"])  # protobuf strings cannot hold lone surrogates
int32s = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 300), st.sampled_from([0, 1, -1, 2**31 - 1]))
dims = st.one_of(st.integers(-5, 400), st.sampled_from([2**31, 2**40, 2**62, -(2**62)]))
dtypes = st.one_of(
    st.sampled_from(["int32", "int64", "float32", "uint8", "", "int31", "float64", "<i4", "object"]),
    st.text(unicode, max_size=12),
)
texts = st.text(unicode, max_size=64)
session_ids = st.one_of(st.just(SESSION), texts, st.integers(1000, 6000).map(lambda n: "s" * n))
temperatures = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e-30, 3e38]), st.floats(width=32)
)
token_ranges = st.sampled_from([(4, 96), (4, 96), (0, 96), (-3, 100), (90, 2**31 - 1)])


def noise(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@st.composite
def tensors(draw) -> teacher_pb2.Tensor:
    kind = draw(st.sampled_from(["random", "random", "consistent", "long", "huge"]))
    if kind == "random":
        data = noise(draw(seeds), draw(st.integers(0, 256)))
        return teacher_pb2.Tensor(dtype=draw(dtypes), shape=draw(st.lists(dims, max_size=4)), data=data)
    if kind == "consistent":  # the right byte count: ids out of range, floats read as ints, ...
        shape = draw(st.lists(st.integers(0, 40), max_size=3))
        size = int(np.prod(shape)) if shape else 1
        dtype = draw(st.sampled_from(["int32", "float32"]))
        return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=noise(draw(seeds), 4 * size))
    if kind == "long":  # over the teacher's context (256)
        length = draw(st.integers(257, 20_000))
        return teacher_pb2.Tensor(dtype="int32", shape=[length], data=np.full(length, 5, np.int32).tobytes())
    # over the 1 MiB request limit: RESOURCE_EXHAUSTED before any of it is parsed
    length = draw(st.integers(300_000, 400_000))
    return teacher_pb2.Tensor(dtype="int32", shape=[length], data=bytes(4 * length))


@st.composite
def valid_scores(draw) -> teacher_pb2.ScoreRequest:
    """Well-formed requests with fuzzed values: most are refused, some are scored."""
    length = draw(st.integers(0, 300))
    low, high = draw(token_ranges)
    tokens = np.random.default_rng(draw(seeds)).integers(low, high, size=length).astype(np.int32)
    return teacher_pb2.ScoreRequest(
        request_id=draw(st.integers(0, 2**64 - 1)),
        session_id=draw(st.sampled_from([SESSION, SESSION, "", "s-" + "0" * 24])),
        tokens=teacher_pb2.Tensor(dtype="int32", shape=[length], data=tokens.tobytes()),
        score_from=draw(st.integers(-2, length + 2)),
        top_k=draw(st.integers(-2, 40)),
    )


fuzzed_scores = st.builds(
    teacher_pb2.ScoreRequest,
    request_id=st.integers(0, 2**64 - 1),
    session_id=session_ids,
    tokens=tensors(),
    score_from=int32s,
    top_k=int32s,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# A valid tokenizer.json, damaged (cut, spliced, truncated, contradictory vocabulary): "$TOKENIZER|op|at|n|text".
tokenizer_mutations = st.builds(
    lambda op, at, n, text: f"{TOKENIZER}|{op}|{at}|{n}|{text}",
    st.sampled_from(["cut", "splice", "truncate", "contradict"]),
    st.integers(0, 5000),
    st.integers(1, 200),
    st.text(alphabet=st.characters(blacklist_characters="|", blacklist_categories=["Cs"]), max_size=30),
)
tokenizer_sources = st.one_of(
    tokenizer_mutations,
    tokenizer_mutations,
    json_values.map(json.dumps),
    texts,
    st.integers(100, 5000).map(lambda depth: "[" * depth + "]" * depth),  # deep nesting: a parser's recursion
    st.just(TOKENIZER),  # valid
)


@st.composite
def open_sessions(draw) -> teacher_pb2.OpenSessionRequest:
    shape = draw(st.sampled_from(["same", "hf", "hf", "hf", "both", "neither"]))
    hf = None
    if shape in ("hf", "both"):
        hf = teacher_pb2.HFTokenizer(
            tokenizer_json=draw(tokenizer_sources),
            special_tokens=draw(st.lists(st.sampled_from(["<eos>", "<pad>", "nope", ""]) | texts, max_size=3)),
            eos_tokens=draw(st.lists(st.sampled_from(["<eos>", "</s>"]) | texts, max_size=2)),
            chat_template=draw(st.sampled_from(["", "{{ messages }}", "{% for %}"]) | texts),
        )
    tokenizer = teacher_pb2.StudentTokenizer(same_as_teacher=shape in ("same", "both"), hf=hf)
    return teacher_pb2.OpenSessionRequest(tokenizer=tokenizer, temperature=draw(temperatures))


bad_headers = st.builds(
    lambda scheme, key: scheme + key,
    st.sampled_from(["Bearer ", "bearer ", "Basic ", ""]),
    st.text(alphabet="abcdef0123456789-", max_size=40),
)


@st.composite
def recipes(draw):
    """(method, request message or raw bytes, metadata)."""
    kind = draw(
        st.sampled_from(
            ["valid-score", "fuzzed-score", "fuzzed-score", "open", "close", "raw", "bad-auth", "stream-score", "info"]
        )
    )
    if kind == "valid-score":
        return "Score", draw(valid_scores()), AUTH
    if kind == "fuzzed-score":
        return "Score", draw(fuzzed_scores), AUTH
    if kind == "stream-score":
        return "ScoreStream", draw(st.one_of(valid_scores(), fuzzed_scores)), AUTH
    if kind == "open":
        return "OpenSession", draw(open_sessions()), AUTH
    if kind == "close":
        return "CloseSession", teacher_pb2.CloseSessionRequest(session_id=draw(session_ids)), AUTH
    if kind == "raw":
        return draw(st.sampled_from(METHODS)), noise(draw(seeds), draw(st.integers(0, 300))), AUTH
    if kind == "bad-auth":
        return draw(st.sampled_from(METHODS[:5])), teacher_pb2.GetInfoRequest(), [("authorization", draw(bad_headers))]
    return "GetInfo", teacher_pb2.GetInfoRequest(), AUTH


def mutants(method: str, message, metadata, seed: int, count: int) -> list:
    """`count` byte-level mutants of the request's wire form, sent raw to the same method."""
    wire = message if isinstance(message, bytes) else message.SerializeToString()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        data = bytearray(wire)
        for _ in range(int(rng.integers(1, 4))):
            op, at = int(rng.integers(4)), int(rng.integers(len(data) + 1))
            if op == 0 and data:  # flip bytes
                for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                    data[position] = int(rng.integers(256))
            elif op == 1:  # cut
                del data[at : at + int(rng.integers(1, 64))]
            elif op == 2:  # duplicate a slice
                data[at:at] = data[at : at + int(rng.integers(1, 64))]
            else:  # insert random bytes
                data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        out.append((method, bytes(data), metadata))
    return out


def resolve(message, session_id: str, tokenizer_json: str):
    """Fill in the placeholders of a drawn request."""
    if isinstance(message, (teacher_pb2.ScoreRequest, teacher_pb2.CloseSessionRequest)):
        if message.session_id == SESSION:
            message.session_id = session_id
    elif isinstance(message, teacher_pb2.OpenSessionRequest) and message.tokenizer.HasField("hf"):
        source = message.tokenizer.hf.tokenizer_json
        if source.startswith(TOKENIZER):
            message.tokenizer.hf.tokenizer_json = _mutated(tokenizer_json, source)
    return message


def _mutated(text: str, recipe: str) -> str:
    if recipe == TOKENIZER:
        return text
    _, op, at, n, insert = recipe.split("|", 4)
    at, n = int(at) % (len(text) + 1), int(n)
    if op == "cut":
        return text[:at] + text[at + n :]
    if op == "splice":
        return text[:at] + insert + text[at:]
    if op == "truncate":
        return text[:at]
    contradicted = text.replace('"vocab":{', '"vocab":{"w1":999999999,"w1":-5,', 1)
    return contradicted.replace('"vocab": {', '"vocab": {"w1": -5, ', 1)


# ---------------------------------------------------------------- sending


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Sender:
    def __init__(self, target: str, session_id: str, tokenizer_json: str, channels: int = 4) -> None:
        self.session_id, self.tokenizer_json = session_id, tokenizer_json
        self.channels = [
            grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)]) for _ in range(channels)
        ]
        self.codes: Counter = Counter()
        self.stream_errors: Counter = Counter()
        self.sent = 0

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def send(self, batch) -> None:
        futures, streamed = [], []
        # A drawn CloseSession may have closed the live session: open it again (same id).
        open_request = teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True))
        teacher_pb2_grpc.TeacherStub(self.channels[0]).OpenSession(open_request, metadata=AUTH, timeout=30)
        expanded = []
        for seed, (method, message, metadata) in batch:
            message = resolve(message, self.session_id, self.tokenizer_json)
            expanded += [(method, message, metadata), *mutants(method, message, metadata, seed, MUTANTS)]
        for index, (method, message, metadata) in enumerate(expanded):
            if method == "ScoreStream" and not isinstance(message, bytes):
                streamed.append(message)
                continue
            channel = self.channels[index % len(self.channels)]
            raw = isinstance(message, bytes)
            serializer = None if raw else type(message).SerializeToString
            path = f"/opd.v1.Teacher/{method}"
            if method == "ScoreStream":  # raw bytes on a stream
                call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
                futures.append(("stream", call(iter([message]), metadata=metadata, timeout=30)))
            else:
                call = channel.unary_unary(path, request_serializer=serializer, response_deserializer=None)
                futures.append(("unary", call.future(message, metadata=metadata, timeout=30)))
        if streamed:
            stub = teacher_pb2_grpc.TeacherStub(self.channels[0])
            futures.append(("score-stream", stub.ScoreStream(iter(streamed), metadata=AUTH, timeout=30)))
        for kind, call in futures:
            try:
                if kind == "unary":
                    call.result()
                elif kind == "stream":
                    list(call)
                else:
                    replies = list(call)
                    assert len(replies) == len(streamed)
                    for reply in replies:
                        code = reply.error.code if reply.HasField("error") else 0
                        self.stream_errors[code] += 1
                        self.codes[_STATUS_BY_NUMBER[code]] += 1
                    continue
                self.codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as error:
                self.codes[error.code()] += 1
        self.sent += len(expanded)


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


@pytest.fixture(scope="module")
def fuzz_teacher(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.txt"
    keys.write_text(f"fuzzer {KEY}\n")
    teacher = start_teacher(
        tiny_model,
        tmp,
        "--api-keys",
        str(keys),
        "--max-request-bytes",
        str(1 << 20),
        "--max-sessions-per-tenant",
        "32",
        "--log-level",
        "ERROR",
    )
    yield teacher.process, teacher.target
    teacher.close(timeout_s=60)
    assert teacher.returncode == 0, teacher.log_path.read_text()[-3000:]


@pytest.mark.slow
def test_ten_thousand_malformed_requests_get_documented_codes(fuzz_teacher, tiny_model):
    process, target = fuzz_teacher
    tokenizer_json = (tiny_model / "tokenizer.json").read_text()
    with grpc.insecure_channel(target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        open_request = teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True))
        session_id = stub.OpenSession(open_request, metadata=AUTH, timeout=30).session_id
        tokens = teacher_pb2.Tensor(dtype="int32", shape=[9], data=np.arange(10, 19, dtype=np.int32).tobytes())
        canary = teacher_pb2.ScoreRequest(session_id=session_id, score_from=3, top_k=5, tokens=tokens)
        expected = stub.Score(canary, metadata=AUTH, timeout=30)

    sender = Sender(target, session_id, tokenizer_json)
    state = {"batches": 0, "measured_before": 0}
    rss = []  # KiB after every measured batch

    @settings(
        max_examples=WARMUP_BATCHES + MEASURED_BATCHES,
        phases=[Phase.generate],
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.tuples(seeds, recipes()), min_size=RECIPES, max_size=RECIPES))
    def fuzz(batch):
        sender.send(batch)
        state["batches"] += 1
        if state["batches"] == WARMUP_BATCHES:
            state["measured_before"] = sender.sent
        elif state["batches"] > WARMUP_BATCHES:
            rss.append(rss_kib(process.pid))
        assert process.poll() is None, "the teacher died"

    try:
        fuzz()
        with grpc.insecure_channel(target) as channel:  # still serving, and still right
            stub = teacher_pb2_grpc.TeacherStub(channel)
            assert stub.OpenSession(open_request, metadata=AUTH, timeout=30).session_id == session_id
            again = stub.Score(canary, metadata=AUTH, timeout=30)
    finally:
        sender.close()
    measured = sender.sent - state["measured_before"]
    rss_start, rss_end = np.median(rss[:RSS_WINDOW]), np.median(rss[-RSS_WINDOW:])
    growth = rss_end / rss_start - 1
    codes = {code.name: count for code, count in sender.codes.most_common()}
    print(
        f"\nfuzz: {sender.sent} requests ({measured} after a warm-up of {state['measured_before']}), "
        f"status codes {codes}; teacher RSS (median of {RSS_WINDOW} batches) {rss_start / 1024:.1f} MiB -> "
        f"{rss_end / 1024:.1f} MiB ({100 * growth:+.2f}%), single readings {min(rss) / 1024:.1f}-{max(rss) / 1024:.1f} MiB"
    )
    assert measured >= 10_000
    assert set(sender.codes) <= DOCUMENTED, codes
    assert sender.codes[grpc.StatusCode.OK] > 0 and sender.codes[grpc.StatusCode.INVALID_ARGUMENT] > 0
    assert again.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert growth < 0.05
