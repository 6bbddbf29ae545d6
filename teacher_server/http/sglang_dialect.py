"""SGLang's native dialect: `POST /generate` with `return_logprob` and `max_new_tokens: 0`.

As SGLang answers it (sglang/srt/managers/tokenizer_manager.py, add_logprob_to_meta_info):
one `input_ids` list gives one object, a list of lists a list of objects; `meta_info` holds,
for the input tokens from `logprob_start_len` on, `input_token_logprobs` as
[logprob, token_id, text or null] (the first entry's logprob is null: nothing precedes it in
the scored span) and, with `top_logprobs_num` K > 0, `input_top_logprobs`: per position a list
of K such triples, null at the first. Text only with `return_text_in_logprobs`. Log-probabilities
are the teacher's at temperature 1, as SGLang's input logprobs.

With `token_ids_logprob` (ids), `input_token_ids_logprobs` holds per position one triple per id
(null at the first), excluded special tokens included. What differs from SGLang: nothing is
generated (`max_new_tokens` must be 0), and special tokens other than EOS are never in the top-K.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from teacher_server.http.scoring import (
    HttpTeacher,
    DialectError,
    PromptScores,
    checked_int,
    score_prompts,
    token_prompts,
    token_text,
)


def model_info(model: str, tokenizer: str) -> dict:
    """GET /get_model_info (and /model_info), in SGLang's shape."""
    return {
        "model_path": model,
        "served_model_name": model,
        "tokenizer_path": tokenizer,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": None,
        "architectures": None,
    }


def _checked_request(body: dict, max_k: int) -> tuple[list[np.ndarray], bool, int, int, bool]:
    """(prompts, batched, logprob_start_len, K, with text) of a generate request, or a 400."""
    if body.get("input_ids") is None:
        raise DialectError("input_ids is required: this teacher scores token ids (text is not tokenized here)")
    if body.get("stream"):
        raise DialectError("streaming is not served: send stream false", "stream")
    sampling = body.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise DialectError("sampling_params must be an object", "sampling_params")
    if sampling.get("max_new_tokens", 128) != 0:
        raise DialectError(
            "this teacher scores input tokens and generates nothing: send sampling_params.max_new_tokens 0 "
            f"(got {sampling.get('max_new_tokens', 128)!r}, SGLang's default is 128)",
            "max_new_tokens",
        )
    value = body["input_ids"]
    batched = isinstance(value, list) and bool(value) and isinstance(value[0], list)
    prompts = token_prompts(value, "input_ids")
    start = checked_int(body, "logprob_start_len", -1, -1)
    for tokens in prompts:
        if start > len(tokens):
            raise DialectError(
                f"logprob_start_len={start} is higher than the number of input tokens {len(tokens)}; "
                "send -1 (no input logprobs) or a start within the input",
                "logprob_start_len",
            )
    top_k = checked_int(body, "top_logprobs_num", 0, 0, max_k)
    return prompts, batched, start, top_k, bool(body.get("return_text_in_logprobs"))


def _requested_ids(body: dict, max_k: int, vocab_size: int) -> list[int]:
    """token_ids_logprob: ids whose log-probabilities every scored position reports."""
    value = body.get("token_ids_logprob")
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(item) is int and item >= 0 for item in value):
        raise DialectError("token_ids_logprob must be a list of token ids (non-negative integers)", "token_ids_logprob")
    if len(value) > max_k:
        raise DialectError(f"token_ids_logprob holds {len(value)} ids, more than {max_k} (the teacher's --max-k)")
    if value and max(value) >= vocab_size:
        raise DialectError(
            f"requested id {max(value)} is outside the vocabulary [0, {vocab_size})", "token_ids_logprob"
        )
    return value


async def generate(body: dict, teacher: HttpTeacher, tenant: str) -> dict[str, Any] | list[dict[str, Any]]:
    """POST /generate."""
    started = time.perf_counter()
    service, texts = teacher.service, teacher.texts
    prompts, batched, start, top_k, with_text = _checked_request(body, service.max_k)
    requested = _requested_ids(body, service.max_k, service.sessions.teacher.model_vocab_size)
    with_logprobs = bool(body.get("return_logprob"))
    firsts = [len(tokens) if start < 0 or not with_logprobs else start for tokens in prompts]
    # Position `first` has no logprob (the scored span starts there); scored from first + 1.
    scored = await score_prompts(service, tenant, prompts, [first + 1 for first in firsts], top_k, requested)
    decoded = texts.get() if with_text else None
    rid = str(body.get("rid") or uuid.uuid4().hex)
    answers = []
    for index, scores in enumerate(scored):
        meta: dict[str, Any] = {
            "id": rid + (f"-{index}" if batched else ""),
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": len(scores.tokens),
            "completion_tokens": 0,
            "cached_tokens": 0,
            "e2e_latency": time.perf_counter() - started,
        }
        if with_logprobs:  # large: built off the event loop
            meta |= await asyncio.to_thread(_input_logprobs, scores, top_k, requested, decoded)
        answers.append({"text": "", "output_ids": [], "meta_info": meta})
    return answers if batched else answers[0]


def _input_logprobs(
    scores: PromptScores, top_k: int, requested: list[int], decoded: list[str] | None
) -> dict[str, Any]:
    tokens, first = scores.tokens.tolist(), scores.first - 1  # the span starts one before the scored rows
    text = (lambda token_id: token_text(decoded, token_id)) if decoded is not None else (lambda token_id: None)
    starts = first < len(tokens)  # the span's first position: an entry without a logprob
    token_entries: list[list] = [[None, tokens[first], text(tokens[first])]] if starts else []
    top_entries: list[list | None] = [None] if starts else []
    requested_entries: list[list | None] = [None] if starts else []
    result = scores.result
    if result is not None:
        actual = result.token_logprobs.tolist()
        ids, logprobs = result.ids.tolist(), result.logprobs.tolist()
        at_requested = result.requested_logprobs.tolist() if requested else []
        for row, target in enumerate(tokens[first + 1 :]):
            token_entries.append([_finite(actual[row]), target, text(target)])
            top = zip(ids[row][:top_k], logprobs[row][:top_k])
            top_entries.append([[_finite(lp), i, text(i)] for i, lp in top if i >= 0])
            if requested:
                requested_entries.append([[_finite(lp), i, text(i)] for i, lp in zip(requested, at_requested[row])])
    meta: dict[str, Any] = {
        "input_token_logprobs": token_entries,
        "output_token_logprobs": [],
        "output_token_logprobs_length": 0,
    }
    if top_k > 0:
        meta |= {"input_top_logprobs": top_entries, "output_top_logprobs": []}
    if requested:
        meta |= {"input_token_ids_logprobs": requested_entries, "output_token_ids_logprobs": []}
    return meta


def _finite(value: float) -> float | None:
    return value if value != float("-inf") else None  # SGLang's orjson writes non-finite numbers as null
