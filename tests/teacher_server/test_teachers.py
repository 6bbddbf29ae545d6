"""Several teachers in one server: two full models (with different tokenizers) and two LoRA
adapters over a third base, against servers that host each teacher alone; names, pins and the
start-up refusals of teacher lists that cannot be served."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests

from opd.metadata import PIN
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from student_trainer.client import TeacherClient
from teacher_server.engines import EngineConfig
from teacher_server.engines.adapters import AdapterError
from teacher_server.teacher_specs import TeacherSpec, TeacherSpecError, resolve_teachers
from teacher_server.teachers import load_teachers
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import TINY_VOCAB, build_tiny_adapter, build_tiny_model

TOP_K = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("teachers")
    base = build_tiny_model(root / "base", seed=3)
    return {
        "plain": tiny_model,
        "other": build_tiny_model(root / "other", seed=4, word="v"),  # another tokenizer
        "base": base,
        "math": build_tiny_adapter(base, root / "math", seed=5, merged=root / "math-merged"),
        "code": build_tiny_adapter(base, root / "code", seed=6, merged=root / "code-merged"),
        "math-merged": root / "math-merged",
        "code-merged": root / "code-merged",
    }


@pytest.fixture(scope="module")
def hosting_all(models):
    specs = resolve_teachers(
        [
            ("plain", str(models["plain"])),
            ("other", str(models["other"])),
            ("base", str(models["base"])),
            ("math", f"base+{models['math']}"),
            ("code", f"base+{models['code']}"),
        ]
    )
    server = LiveServer(server_config(models["plain"], teachers=specs, http_port=0))
    yield server
    server.stop()


def rollouts(count: int, seed: int) -> list[tuple[list[int], int]]:
    """Random sequences of word ids (4 .. TINY_VOCAB-1, in either tiny tokenizer), prompt of 4."""
    rng = random.Random(seed)
    return [([1] + [rng.randrange(4, TINY_VOCAB) for _ in range(rng.randrange(8, 40))], 4) for _ in range(count)]


def alone_config(models: dict, name: str):
    """A server hosting only teacher `name` (an adapter: with the base it needs, under the same names)."""
    if name in ("math", "code"):
        specs = resolve_teachers([("base", str(models["base"])), (name, f"base+{models[name]}")])
        return server_config(models["base"], teachers=specs, default_teacher=name)
    return server_config(models[name], teachers=(TeacherSpec(name=name, model=str(models[name])),))


def test_an_adapter_teacher_scores_as_the_base_with_the_adapter_merged_in(models, hosting_all):
    batch = rollouts(8, seed=9)
    merged = LiveServer(server_config(models["math-merged"]))
    try:
        expected = scores_of(merged.target, "", batch)
    finally:
        merged.stop()
    for got, want in zip(scores_of(hosting_all.target, "math", batch), expected, strict=True):
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)  # float32 merge rounding


def scores_of(target: str, teacher: str, batch) -> list:
    with TeacherClient(target, teacher=teacher) as client:
        client.open_session()
        return client.score_many(batch, TOP_K)


def test_each_teacher_answers_as_a_server_hosting_it_alone(models, hosting_all):
    batches = {name: rollouts(24, seed) for seed, name in enumerate(["plain", "other", "base", "math", "code"])}
    # All five at once: the server's queue mixes teachers and tenants' requests.
    with ThreadPoolExecutor(5) as pool:
        futures = {name: pool.submit(scores_of, hosting_all.target, name, batch) for name, batch in batches.items()}
        together = {name: future.result(timeout=120) for name, future in futures.items()}
    worst, positions = 0.0, 0
    for name in batches:
        alone = LiveServer(alone_config(models, name))
        try:
            expected = scores_of(alone.target, name, batches[name])
        finally:
            alone.stop()
        for got, want in zip(together[name], expected, strict=True):
            np.testing.assert_array_equal(got.ids, want.ids, err_msg=name)
            np.testing.assert_array_equal(got.mask, want.mask, err_msg=name)
            worst = max(worst, float(np.abs(got.logprobs - want.logprobs).max()))
            worst = max(worst, float(np.abs(got.token_logprobs - want.token_logprobs).max()))
            positions += len(got.mask)
    print(f"5 teachers together vs alone: {positions} positions, top-{TOP_K} ids equal, worst |diff| {worst:.2e}")
    assert worst <= 1e-5, worst
    # ... and the adapters change the base's answers (else the comparison above shows nothing).
    base, math = together["base"][0], scores_of(hosting_all.target, "math", batches["base"][:1])[0]
    assert np.abs(base.logprobs - math.logprobs).max() > 0.1


def test_get_info_lists_the_teachers_and_sessions_name_theirs(hosting_all, models):
    with grpc.insecure_channel(hosting_all.target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        info = stub.GetInfo(teacher_pb2.GetInfoRequest())
        listed = {teacher.name: teacher for teacher in info.teachers}
        assert list(listed) == ["plain", "other", "base", "math", "code"]
        assert info.default_teacher == "plain" and info.model == str(models["plain"])
        assert listed["math"].base == "base" and listed["math"].model == f"{models['base']}+{models['math']}"
        assert len({teacher.weights_sha256 for teacher in info.teachers}) == 5
        same = teacher_pb2.StudentTokenizer(same_as_teacher=True)
        opened = {
            name: stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, teacher=name))
            for name in ("plain", "math", "")
        }
        assert opened["math"].teacher == "math" and opened[""].teacher == "plain"
        assert opened[""].session_id == opened["plain"].session_id != opened["math"].session_id


def test_unknown_teachers_and_pins_to_another_teacher_are_refused_and_the_server_keeps_serving(hosting_all):
    same = teacher_pb2.StudentTokenizer(same_as_teacher=True)
    with grpc.insecure_channel(hosting_all.target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, teacher="physics"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "physics" in refused.value.details() and "plain, other, base, math, code" in refused.value.details()
        listed = {t.name: t for t in stub.GetInfo(teacher_pb2.GetInfoRequest()).teachers}
        math_pin = ((PIN, f"{listed['math'].model}@{listed['math'].weights_sha256}"),)
        math_session = stub.OpenSession(
            teacher_pb2.OpenSessionRequest(tokenizer=same, teacher="math"), metadata=math_pin
        )
        with pytest.raises(grpc.RpcError) as pinned:
            stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, teacher="code"), metadata=math_pin)
        assert pinned.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'code'" in pinned.value.details()
        code_session = stub.OpenSession(teacher_pb2.OpenSessionRequest(tokenizer=same, teacher="code"))
        tokens = np.array([1, 5, 6, 7, 8], dtype=np.int32)
        request = teacher_pb2.ScoreRequest(
            session_id=code_session.session_id,
            tokens=teacher_pb2.Tensor(dtype="int32", shape=[5], data=tokens.tobytes()),
            score_from=2,
            top_k=4,
        )
        with pytest.raises(grpc.RpcError) as scored:
            stub.Score(request, metadata=math_pin)
        assert scored.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        request.session_id = math_session.session_id
        assert stub.Score(request, metadata=math_pin).coverage == 1.0


def test_teacher_lists_that_cannot_be_served_are_refused_at_start_up_naming_both(models, tmp_path):
    with pytest.raises(TeacherSpecError, match="math=missing.*base teacher 'missing'"):
        resolve_teachers([("plain", str(models["plain"])), ("math", f"missing+{models['math']}")])
    with pytest.raises(TeacherSpecError, match="given twice"):
        resolve_teachers([("a", str(models["plain"])), ("a", str(models["other"]))])
    narrow = build_tiny_model(tmp_path / "narrow", seed=7, hidden=32)
    narrow_adapter = build_tiny_adapter(narrow, tmp_path / "narrow-adapter", seed=8)
    specs = (
        TeacherSpec(name="base", model=str(models["base"])),
        TeacherSpec("x", base="base", adapter=str(narrow_adapter)),
    )
    with pytest.raises(AdapterError, match=f"'x'.*{narrow_adapter}.*'base'"):
        load_teachers(specs, "hf", EngineConfig(model=""))
    adapted = (
        TeacherSpec(name="base", model=str(models["base"])),
        TeacherSpec("m", base="base", adapter=str(models["math"])),
    )
    with pytest.raises(AdapterError, match="sglang engine does not host"):  # refused before anything loads
        load_teachers(adapted, "sglang", EngineConfig(model=""))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_teachers(specs[:1] + (TeacherSpec("y", base="base", adapter=str(tmp_path)),), "hf", EngineConfig(model=""))


def test_the_http_dialects_pick_the_teacher_by_model_or_lora_path(hosting_all, models):
    base = f"http://127.0.0.1:{hosting_all.server.http_port}"
    listed = {entry["id"]: entry for entry in requests.get(f"{base}/v1/models", timeout=30).json()["data"]}
    assert list(listed) == [str(models["plain"]), "other", "base", "math", "code"]  # the default by its path
    assert listed["math"]["parent"] == "base" and listed["other"]["parent"] is None
    tokens, _ = rollouts(1, seed=3)[0]
    expected = scores_of(hosting_all.target, "math", [(tokens, 1)])[0]
    body = {"model": "math", "prompt": tokens, "max_tokens": 1, "prompt_logprobs": 4}
    completion = requests.post(f"{base}/v1/completions", json=body, timeout=30).json()
    assert completion["model"] == "math"
    entries = completion["choices"][0]["prompt_logprobs"][1:]
    for entry, target, want in zip(entries, tokens[1:], expected.token_logprobs, strict=True):
        assert abs(entry[str(target)]["logprob"] - want) <= 1e-5
    sglang = {"input_ids": tokens, "return_logprob": True, "logprob_start_len": 0, "lora_path": "math"}
    sglang["sampling_params"] = {"max_new_tokens": 0}
    generated = requests.post(f"{base}/generate", json=sglang, timeout=30).json()
    got = [entry[0] for entry in generated["meta_info"]["input_token_logprobs"][1:]]
    np.testing.assert_allclose(got, expected.token_logprobs, atol=1e-5)
    missing = requests.post(f"{base}/v1/completions", json=body | {"model": "physics"}, timeout=30)
    assert missing.status_code == 404 and "`physics` does not exist" in missing.json()["error"]["message"]
    assert "`math`" in missing.json()["error"]["message"]
