"""The HTTP front end (teacher_server/http/) over real HTTP on 127.0.0.1, against the gRPC path.

Both dialects return, position for position, the same teacher top-K ids and log-probabilities
as a gRPC same-tokenizer session at temperature 1 (the same service and engine), in the shapes
vLLM's and SGLang's servers use; keys work as Bearer and as Basic passwords and are required
everywhere but the health checks; every bad input is a 4xx with the reason, never a 500.
"""

from __future__ import annotations

import secrets

import grpc
import numpy as np
import pytest
import requests

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.auth import ApiKeys
from tests.conftest import LiveServer, server_config
from tests.helpers import MAX_K, TOL as REFERENCE_TOL, make_rollouts, open_same_as_teacher, reference

KEY = "alice-" + secrets.token_hex(16)
OTHER_KEY = "bob-" + secrets.token_hex(16)
TOL = 1e-5  # the same engine: only batching differs between the two paths


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("http-keys") / "keys.txt"
    keys.write_text(f"alice {KEY}\nbob {OTHER_KEY}\n")
    live = LiveServer(server_config(tiny_model, http_port=0, api_keys=ApiKeys.load(keys), max_request_bytes=200_000))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def grpc_scores(server):
    """score(tokens, score_from, top_k) over gRPC, in a same-tokenizer session at temperature 1."""
    channel = grpc.insecure_channel(server.target)
    stub = teacher_pb2_grpc.TeacherStub(channel)
    metadata = [("authorization", f"Bearer {KEY}")]
    session_id = open_same_as_teacher(stub, 1.0, metadata)

    def score(tokens: np.ndarray, score_from: int, top_k: int) -> teacher_pb2.ScoreResponse:
        request = teacher_pb2.ScoreRequest(
            session_id=session_id, tokens=to_tensor(tokens), score_from=score_from, top_k=top_k
        )
        return stub.Score(request, metadata=metadata, timeout=30)

    yield score
    channel.close()


def post(base: str, path: str, body, key: str = KEY) -> requests.Response:
    return requests.post(base + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


def completion_body(prompts: list[list[int]], top_k: int, model: str | None = None) -> dict:
    body = {"prompt": prompts, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": top_k}
    return body | ({"model": model} if model else {})


def test_vllm_completions_give_the_grpc_scores_in_vllm_shapes(base, grpc_scores):
    rollouts = make_rollouts(12, seed=3)
    model = requests.get(base + "/v1/models", auth=("alice", KEY), timeout=10).json()["data"][0]["id"]
    top_k = 8
    answer = post(base, "/v1/completions", completion_body([t.tolist() for t, _, _ in rollouts], top_k, model))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["model"] == model
    assert [choice["index"] for choice in body["choices"]] == list(range(len(rollouts)))
    compared = 0
    for (tokens, _, _), choice in zip(rollouts, body["choices"]):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(tokens) and entries[0] is None
        reference = grpc_scores(tokens, 1, top_k)
        ids, logprobs = from_tensor(reference.ids, name="ids"), from_tensor(reference.logprobs, name="logprobs")
        actual = from_tensor(reference.token_logprobs, name="token_logprobs")
        for row, entry in enumerate(entries[1:]):
            keys = list(entry)
            target = str(int(tokens[row + 1]))
            # The actual token first, then the top-K in descending order, ranked 1..K.
            assert keys[0] == target
            assert abs(entry[target]["logprob"] - actual[row]) <= TOL
            top = sorted((key for key in keys if entry[key]["rank"] <= top_k), key=lambda key: entry[key]["rank"])
            assert [int(key) for key in top] == [int(i) for i in ids[row] if i >= 0]
            assert [entry[key]["rank"] for key in top] == list(range(1, len(top) + 1))
            assert np.allclose([entry[key]["logprob"] for key in top], logprobs[row][: len(top)], atol=TOL, rtol=0)
            assert len(entry) in (top_k, top_k + 1)
            compared += 1
    assert compared == sum(len(tokens) - 1 for tokens, _, _ in rollouts)


def test_sglang_generate_gives_the_grpc_scores_in_sglang_shapes(base, grpc_scores):
    tokens = make_rollouts(1, seed=5)[0][0]
    start, top_k = 3, 4
    body = {
        "input_ids": tokens.tolist(),
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": top_k,
        "return_text_in_logprobs": True,
    }
    answer = post(base, "/generate", body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["text"] == "" and result["output_ids"] == []
    meta = result["meta_info"]
    assert meta["prompt_tokens"] == len(tokens) and meta["completion_tokens"] == 0
    token_entries, top_entries = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert len(token_entries) == len(top_entries) == len(tokens) - start
    assert token_entries[0][:2] == [None, int(tokens[start])] and top_entries[0] is None
    reference = grpc_scores(tokens, start + 1, top_k)
    ids, logprobs = from_tensor(reference.ids, name="ids"), from_tensor(reference.logprobs, name="logprobs")
    actual = from_tensor(reference.token_logprobs, name="token_logprobs")
    for row in range(len(tokens) - start - 1):
        logprob, token_id, text = token_entries[row + 1]
        assert token_id == int(tokens[start + 1 + row]) and abs(logprob - actual[row]) <= TOL
        assert text == f"w{token_id - 4}"  # the tiny tokenizer's words
        assert [entry[1] for entry in top_entries[row + 1]] == ids[row].tolist()
        assert np.allclose([entry[0] for entry in top_entries[row + 1]], logprobs[row], atol=TOL, rtol=0)
    # A batch answers a list; without return_logprob there are no logprobs.
    batch = post(base, "/generate", {"input_ids": [tokens.tolist()] * 2, "sampling_params": {"max_new_tokens": 0}})
    assert batch.status_code == 200 and len(batch.json()) == 2
    assert "input_token_logprobs" not in batch.json()[0]["meta_info"]


def test_sglang_token_ids_logprob_are_the_float64_reference(base, reference_model):
    """input_token_ids_logprobs at every position, the excluded special token and EOS included."""
    tokens = make_rollouts(1, seed=7)[0][0]
    wanted = [2, 3, 10, 95]  # EOS, the special token (never in the top-K), two words
    body = {
        "input_ids": tokens.tolist(),
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "token_ids_logprob": wanted,
    }
    meta = post(base, "/generate", body).json()["meta_info"]
    entries = meta["input_token_ids_logprobs"]
    assert entries[0] is None and len(entries) == len(tokens) and "input_top_logprobs" not in meta
    assert [[token_id for _, token_id, _ in row] for row in entries[1:]] == [wanted] * (len(tokens) - 1)
    got = np.array([[logprob for logprob, _, _ in row] for row in entries[1:]])
    expected = reference(reference_model, tokens, 1)[:, wanted]
    assert np.abs(got - expected).max() <= REFERENCE_TOL


def test_keys_are_required_everywhere_but_health_as_bearer_or_basic(base):
    routes = [("GET", "/v1/models"), ("GET", "/version"), ("GET", "/get_model_info"), ("POST", "/v1/completions")]
    routes += [("POST", "/generate")]
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic !!"}):
            answer = requests.request(method, base + path, headers=headers, json={}, timeout=10)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert "key" in answer.text
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert requests.get(base + "/health_generate", timeout=10).status_code == 200
    url = base.replace("http://", f"http://alice:{KEY}@")  # the form TRL's VLLMClient can send
    assert requests.get(url + "/v1/models", timeout=10).status_code == 200
    assert requests.get(base + "/version", headers={"authorization": f"Bearer {OTHER_KEY}"}, timeout=10).ok


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/completions", b"{", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"prompt": [[1, 2, 999]], "max_tokens": 1, "prompt_logprobs": 2}, 400, "out of vocabulary"),
        ("/v1/completions", {"prompt": [1, -2, 3], "max_tokens": 1, "prompt_logprobs": 2}, 400, "out of vocabulary"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "prompt_logprobs": 2}, 400, "token ids only"),
        ("/v1/completions", {"prompt": [[1, "x"]], "max_tokens": 1, "prompt_logprobs": 2}, 400, "integer token ids"),
        ("/v1/completions", {"prompt": [], "max_tokens": 1, "prompt_logprobs": 2}, 400, "non-empty"),
        ("/v1/completions", {"prompt": [1, 2], "prompt_logprobs": 2}, 400, "max_tokens must be 1"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1}, 400, "prompt_logprobs is required"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": "2"}, 400, "must be an integer"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": MAX_K + 1}, 400, "max allowed: 32"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 2, "stream": True}, 400, "stream"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 2, "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 2, "model": "x"}, 404, "`x`"),
        ("/v1/completions", {"prompt": [1] * 300, "max_tokens": 1, "prompt_logprobs": 2}, 400, "context holds 256"),
        ("/v1/completions", {"prompt": [[1, 2]] * 40_000, "max_tokens": 1, "prompt_logprobs": 2}, 413, "200000"),
        ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}}, 400, "max_new_tokens 0"),
        ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {}}, 400, "max_new_tokens 0"),
        ("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 0}}, 400, "input_ids is required"),
        (
            "/generate",
            {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "logprob_start_len": 4},
            400,
            "higher than the number of input tokens 3",
        ),
        (
            "/generate",
            {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "top_logprobs_num": MAX_K + 1},
            400,
            "top_logprobs_num must be between 0 and 32",
        ),
        (
            "/generate",
            {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "token_ids_logprob": ["a"]},
            400,
            "list of token ids",
        ),
        (
            "/generate",
            {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "token_ids_logprob": [500]},
            400,
            "requested id 500 is outside the vocabulary",
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_the_reason(base, path, body, status, needle):
    data = body if isinstance(body, bytes) else None
    answer = requests.post(
        base + path,
        data=data,
        json=None if data is not None else body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert needle in error["message"]
    if path.startswith("/v1"):  # OpenAI's error object
        assert error["code"] == status and "type" in error and "param" in error


def test_short_prompts_and_spans_without_positions_answer_empty(base):
    answer = post(base, "/v1/completions", completion_body([[5]], 2))
    assert answer.status_code == 200 and answer.json()["choices"][0]["prompt_logprobs"] == [None]
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    meta = post(base, "/generate", body | {"logprob_start_len": -1, "top_logprobs_num": 2}).json()["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []
    meta = post(base, "/generate", body | {"logprob_start_len": 1}).json()["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 6, None]]


def test_service_answers_http_and_grpc_alike_for_the_same_tenant(server, base):
    """One scheduler and one session per tenant: HTTP requests show in the gRPC session's stats."""
    with grpc.insecure_channel(server.target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        metadata = [("authorization", f"Bearer {OTHER_KEY}")]
        session_id = open_same_as_teacher(stub, 1.0, metadata)
        before = stub.GetSessionStats(
            teacher_pb2.GetSessionStatsRequest(session_id=session_id), metadata=metadata, timeout=30
        ).requests
        assert post(base, "/v1/completions", completion_body([[5, 6, 7]], 2), key=OTHER_KEY).status_code == 200
        after = stub.GetSessionStats(
            teacher_pb2.GetSessionStatsRequest(session_id=session_id), metadata=metadata, timeout=30
        ).requests
    assert after == before + 1


def test_an_open_server_needs_no_key_and_health_is_503_while_draining(tiny_model):
    live = LiveServer(server_config(tiny_model, http_port=0))
    base = f"http://127.0.0.1:{live.server.http_port}"
    try:
        assert requests.get(base + "/health", timeout=10).status_code == 200
        assert requests.post(base + "/v1/completions", json=completion_body([[5, 6]], 2), timeout=30).ok
        live.server.http_front.draining = True
        assert requests.get(base + "/health", timeout=10).status_code == 503
        answer = post(base, "/v1/completions", completion_body([[5, 6, 7]], 2))
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        live.server.http_front.draining = False
    finally:
        live.stop()


def test_requests_are_counted_per_front_end(server, base):
    from prometheus_client import generate_latest

    assert post(base, "/v1/completions", completion_body([[5, 6, 7]], 2)).status_code == 200
    assert requests.get(base + "/v1/models", timeout=10).status_code == 401
    metrics = generate_latest(server.server.metrics.registry).decode()
    assert 'opd_requests_total{code="200",method="HTTP /v1/completions",tenant="alice"}' in metrics
    assert 'method="HTTP /v1/models",tenant="-"' in metrics and 'code="401"' in metrics


def test_mutual_tls_over_http(tiny_model, tmp_path):
    from tests.teacher_server.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    config = server_config(
        tiny_model,
        http_port=0,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    live = LiveServer(config)
    base = f"https://127.0.0.1:{live.server.http_port}"
    try:
        client = (str(pki.client_cert), str(pki.client_key))
        answer = requests.post(
            base + "/v1/completions", json=completion_body([[5, 6]], 2), verify=str(pki.ca), cert=client, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["prompt_logprobs"][1]
        for refused in (
            {"verify": str(pki.ca)},
            {"verify": str(pki.ca), "cert": (str(pki.rogue_client_cert), str(pki.rogue_client_key))},
        ):
            # No client certificate, or one of another CA: the handshake fails, or (TLS 1.3) the
            # server closes the connection right after it (requests' SSLError is a ConnectionError).
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(base + "/health", timeout=10, **refused)
        with pytest.raises(requests.exceptions.ConnectionError):  # plaintext to a TLS port
            requests.get(base.replace("https", "http") + "/health", timeout=10)
    finally:
        live.stop()
