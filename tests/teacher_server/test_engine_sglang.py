"""The sglang engine's request building and response parsing, against SGLang's documented formats.

SGLang cannot run here (its wheel needs CUDA), so nothing in this file talks to a
live SGLang: the adapter is UNTESTED against a real SGLang (see the README).

What SGLang returns with return_logprob=True, logprob_start_len=L and
top_logprobs_num=N, in `output["meta_info"]` (sgl-project/sglang):

* python/sglang/srt/managers/scheduler_output_processor_mixin.py,
  `_process_input_token_logprobs`: "Regular request: add None at start, remove
  last (sampling token)": input_token_logprobs_val = [None] + computed[:-1], where
  computed[j] = log p(ids[L+1+j] | ids[:L+1+j]) and the last one predicts the token
  after the prompt; input_token_logprobs_idx = origin_input_ids[L:].
  `_process_input_top_logprobs`: [None] + the top-N of every computed position,
  last one popped.
* python/sglang/srt/managers/tokenizer_manager.py, `add_logprob_to_meta_info`,
  `detokenize_logprob_tokens` (tuples (logprob, token_id, text or None)) and
  `detokenize_top_logprobs_tokens` (None or a list of such tuples per position),
  stored as meta_info["input_token_logprobs"] and meta_info["input_top_logprobs"].
  Over HTTP (/generate) the tuples arrive as JSON lists.
* docs/references/sampling_params.md, `GenerateReqInput`: input_ids,
  return_logprob, logprob_start_len, top_logprobs_num, sampling_params
  (max_new_tokens=0: prefill only).

`documented_meta_info` below builds exactly that from a float64 reference of the
tiny model, and `DocumentedSGLang` answers `Engine.generate` with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from teacher_server.engines import EngineConfig, ScoringJob, load_engine
from teacher_server.engines.base import Branch
from teacher_server.engines.sglang import (
    NEXT_PLACEHOLDER,
    SAMPLING_PARAMS,
    SGLangEngine,
    engine_options,
    generate_request,
    parse_meta_info,
)
from teacher_server.engines.support import EXCLUDE_SLACK, prompts_of
from testkit.tiny_model import TINY_VOCAB
from tests.helpers import check_against_reference, reference


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64).eval()


def next_token_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    """float64 [n, V]: row i = log p(. | tokens[:i + 1]), i.e. the distribution of token i + 1
    (the last row predicts the token after the prompt, which SGLang computes and drops)."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None], use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def documented_meta_info(logp: np.ndarray, tokens: np.ndarray, start: int, top_n: int, *, as_json=False, text=False):
    """meta_info as SGLang builds it (see the module docstring) for logprob_start_len=start."""
    n = len(tokens)
    computed = [float(logp[t - 1, tokens[t]]) if t < n else float(logp[n - 1].max()) for t in range(start + 1, n + 1)]
    token_val = [None] + computed[:-1]
    token_idx = [int(i) for i in tokens[start:]]
    top_val, top_idx = [None], [None]
    for t in range(start + 1, n + 1):  # the distribution of token t, t = n being the sampled one
        order = np.argsort(-logp[t - 1], kind="stable")[:top_n]
        top_val.append([float(v) for v in logp[t - 1, order]])
        top_idx.append([int(i) for i in order])
    top_val.pop()
    top_idx.pop()

    def tuples(values, ids):
        return [(v, i, f"w{i}" if text else None) for v, i in zip(values, ids)]

    meta = {
        "input_token_logprobs": tuples(token_val, token_idx),
        "input_top_logprobs": [None if v is None else tuples(v, i) for v, i in zip(top_val, top_idx)],
        "output_token_logprobs": [],
    }
    return json.loads(json.dumps(meta)) if as_json else meta


class DocumentedSGLang:
    """Stands in for sglang.Engine: answers generate() with the documented meta_info of the reference."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[dict] = []

    def generate(self, **request):
        self.calls.append(request)
        outputs = []
        for ids, params, start, top_n in zip(
            request["input_ids"], request["sampling_params"], request["logprob_start_len"], request["top_logprobs_num"]
        ):
            assert params["max_new_tokens"] == 0, "prefill only"
            tokens = np.asarray(ids)
            meta = documented_meta_info(next_token_logprobs(self.model, tokens), tokens, start, top_n)
            outputs.append({"output_ids": [], "meta_info": {"id": "x", "prompt_tokens": len(ids), **meta}})
        return outputs


def adapter(model) -> SGLangEngine:
    """An SGLangEngine whose sglang.Engine is DocumentedSGLang (SGLang itself cannot be imported here)."""
    engine = object.__new__(SGLangEngine)
    engine.model_name, engine.dtype, engine.vocab_size, engine.max_sequence_length = "tiny", "float32", TINY_VOCAB, 255
    engine.engine = DocumentedSGLang(model)
    engine._thread = ThreadPoolExecutor(max_workers=1)
    return engine


def test_request_uses_token_ids_prefill_only_and_starts_one_before_score_from():
    job = ScoringJob(
        token_ids=np.array([5, 6, 7, 8], dtype=np.int32),
        score_from=2,
        top_k=4,
        branches=(Branch(attach=3, token_ids=np.array([40, 41], dtype=np.int32)),),
    )
    prompts = prompts_of(job)
    request = generate_request(prompts, [4 + 3, 4 + 3])
    assert request == {
        # the branch: token_ids[:3] + branch + a placeholder whose distribution is the row after the branch
        "input_ids": [[5, 6, 7, 8], [5, 6, 7, 40, 41, NEXT_PLACEHOLDER]],
        "sampling_params": [SAMPLING_PARAMS, SAMPLING_PARAMS],
        "return_logprob": [True, True],
        "logprob_start_len": [1, 2],
        "top_logprobs_num": [7, 7],
    }
    assert SAMPLING_PARAMS == {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0}
    assert all(type(i) is int for ids in request["input_ids"] for i in ids)  # JSON-serialisable, not numpy
    json.dumps(request)


def test_engine_options_map_our_flags_to_sglang_server_args():
    config = EngineConfig(
        model="/models/t",
        dtype="bfloat16",
        tensor_parallel_size=4,
        gpu_memory_utilization=0.8,
        max_model_len=32768,
        max_num_batched_tokens=4096,
        engine_args={"attention_backend": "fa3"},
    )
    assert engine_options(config) == {
        "model_path": "/models/t",
        "dtype": "bfloat16",
        "tp_size": 4,
        "mem_fraction_static": 0.8,
        "skip_tokenizer_init": True,
        "random_seed": 0,
        "context_length": 32768,
        "chunked_prefill_size": 4096,
        "attention_backend": "fa3",
    }
    assert "context_length" not in engine_options(EngineConfig(model="m"))


def test_parse_a_literal_documented_payload():
    # input_ids [10, 11, 12], logprob_start_len 0, top_logprobs_num 2, as the HTTP endpoint returns it (JSON lists).
    meta = {
        "input_token_logprobs": [[None, 10, None], [-1.5, 11, None], [-0.25, 12, None]],
        "input_top_logprobs": [None, [[-0.75, 20, None], [-1.5, 11, None]], [[-0.25, 12, None], [-2.0, 30, None]]],
    }
    ids, logprobs, token_logprobs = parse_meta_info(meta, np.array([10, 11, 12]), score_from=1, num=2)
    np.testing.assert_array_equal(ids, [[20, 11], [12, 30]])
    np.testing.assert_array_equal(logprobs, [[-0.75, -1.5], [-0.25, -2.0]])
    np.testing.assert_array_equal(token_logprobs, [-1.5, -0.25])


@pytest.mark.parametrize("as_json, text", [(False, False), (True, False), (True, True)], ids=["tuples", "json", "text"])
def test_parse_documented_meta_info_of_the_reference(reference_model, as_json, text):
    tokens = np.random.default_rng(3).integers(0, TINY_VOCAB, 50).astype(np.int32)
    logp = next_token_logprobs(reference_model, tokens)
    for score_from in (1, 2, 17, len(tokens) - 1):
        meta = documented_meta_info(logp, tokens, score_from - 1, 9, as_json=as_json, text=text)
        ids, logprobs, token_logprobs = parse_meta_info(meta, tokens, score_from, 9)
        rows = np.arange(score_from - 1, len(tokens) - 1)  # logp row t - 1 predicts token t
        assert ids.shape == (len(tokens) - score_from, 9)
        np.testing.assert_array_equal(ids, np.argsort(-logp[rows], axis=1, kind="stable")[:, :9])
        np.testing.assert_allclose(logprobs, np.take_along_axis(logp[rows], ids, axis=1), rtol=0, atol=1e-6)
        np.testing.assert_allclose(token_logprobs, logp[rows, tokens[score_from:]], rtol=0, atol=1e-6)


def test_malformed_payloads_are_reported():
    tokens = np.array([10, 11, 12])
    good = {
        "input_token_logprobs": [(None, 10, None), (-1.5, 11, None), (-0.25, 12, None)],
        "input_top_logprobs": [None, [(-0.75, 20, None), (-1.5, 11, None)], [(-0.25, 12, None), (-2.0, 30, None)]],
    }
    with pytest.raises(RuntimeError, match="expected 2 of each"):
        parse_meta_info(good, tokens, score_from=2, num=2)  # a payload for another logprob_start_len
    shifted = dict(good, input_token_logprobs=[(None, 10, None), (-1.5, 12, None), (-0.25, 12, None)])
    with pytest.raises(RuntimeError, match="expected a log-probability for token 11"):
        parse_meta_info(shifted, tokens, score_from=1, num=2)
    with pytest.raises(RuntimeError, match="expected 3"):
        parse_meta_info(good, tokens, score_from=1, num=3)


def test_adapter_scores_like_the_reference_and_the_hf_engine(reference_model, tiny_model):
    from teacher_server.engines.hf import HFEngine

    engine = adapter(reference_model)
    rng = np.random.default_rng(8)
    jobs = []
    for i in range(6):
        tokens = rng.integers(0, TINY_VOCAB, int(rng.integers(2, 90))).astype(np.int32)
        exclude = np.array([0, 1, 3]) if i % 2 else np.zeros(0, dtype=np.int64)
        branches = tuple(
            Branch(
                attach=int(rng.integers(1, len(tokens) + 1)),
                token_ids=rng.integers(4, TINY_VOCAB, int(m)).astype(np.int32),
            )
            for m in rng.integers(1, 5, size=i % 3)
        )
        jobs.append(
            ScoringJob(
                token_ids=tokens,
                score_from=int(rng.integers(1, len(tokens))),
                top_k=int(rng.integers(1, 33)),
                exclude_ids=exclude,
                branches=branches,
            )
        )
    assert sum(len(job.branches) for job in jobs) >= 3
    got = engine.score(jobs)
    assert len(engine.engine.calls) == 1  # one batch, one generate call (branches included)
    hf = HFEngine(EngineConfig(model=str(tiny_model), chunk_size=16)).score(jobs)
    for job, scores, expected in zip(jobs, got, hf):
        check_against_reference(scores, job, reference(reference_model, job.token_ids, job.score_from))
        assert_same_scores(scores, expected)


def assert_same_scores(got, expected, atol=1e-4) -> None:
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=atol)
    np.testing.assert_allclose(got.token_logprobs, expected.token_logprobs, rtol=0, atol=atol)
    if expected.branch_ids is None:
        assert got.branch_ids is None and got.branch_logprobs is None and got.branch_token_logprobs is None
        return
    np.testing.assert_array_equal(got.branch_ids, expected.branch_ids)
    np.testing.assert_allclose(got.branch_logprobs, expected.branch_logprobs, rtol=0, atol=atol)
    np.testing.assert_allclose(got.branch_token_logprobs, expected.branch_token_logprobs, rtol=0, atol=atol)


def test_many_excluded_ids_take_a_second_pass_and_k_beyond_the_vocabulary_pads(reference_model):
    engine = adapter(reference_model)
    tokens = np.random.default_rng(4).integers(4, TINY_VOCAB, 40).astype(np.int32)
    ref = reference(reference_model, tokens, 5)
    exclude = np.unique(np.r_[np.argsort(-ref, axis=1)[:, :3].ravel(), np.arange(4, 4 + EXCLUDE_SLACK + 8)])
    job = ScoringJob(token_ids=tokens, score_from=5, top_k=10, exclude_ids=exclude)
    (scores,) = engine.score([job])
    check_against_reference(scores, job, ref)
    assert [call["top_logprobs_num"] for call in engine.engine.calls] == [[10 + EXCLUDE_SLACK], [10 + len(exclude)]]
    job = ScoringJob(token_ids=tokens, score_from=5, top_k=TINY_VOCAB + 2, exclude_ids=np.array([0, 3]))
    (scores,) = engine.score([job])
    check_against_reference(scores, job, ref)
    assert engine.engine.calls[-1]["top_logprobs_num"] == [TINY_VOCAB]


def test_only_temperature_one_is_served(reference_model):
    engine = adapter(reference_model)
    assert engine.temperatures == (1.0,)
    with pytest.raises(ValueError, match="temperature 1 only"):
        engine.score([ScoringJob(token_ids=np.array([5, 6, 7]), score_from=1, top_k=2, temperature=0.5)])
    assert engine.engine.calls == []


def test_engine_modules_import_nothing_heavy_and_say_what_to_install():
    code = (
        "import sys, teacher_server.engines, teacher_server.engines.vllm, teacher_server.engines.sglang\n"
        "assert 'vllm' not in sys.modules and 'sglang' not in sys.modules, 'eager import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="sglang engine needs SGLang"):
            load_engine("sglang", EngineConfig(model="unused"))
