"""vLLM's OpenAI-compatible dialect: `POST /v1/completions` with `prompt_logprobs`, `GET /v1/models`.

As vLLM answers it (vllm/entrypoints/openai/completion/protocol.py, vllm/logprobs.py):
`choices[i].prompt_logprobs` has one entry per prompt token, entry 0 null; every other entry
is a dict keyed by token id (a string) of {logprob, rank, decoded_token}, the prompt's actual
token first, then the top-K in descending order (K or K + 1 entries). Log-probabilities are
the teacher's at temperature 1 whatever the request's temperature, as vLLM's prompt logprobs.

What differs from vLLM, on purpose:
* nothing is generated: `max_tokens` must be 1 (the most a scoring client asks for) and the
  choice's `text` is empty; anything that needs sampled text is a 400 that says so;
* special tokens other than EOS are never in the top-K (as in the gRPC sessions), so `rank`
  counts positions in the returned top-K; the actual token outside it gets rank K + 1, a
  lower bound (vLLM reports its rank in the full vocabulary);
* a log-probability of -inf is sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from teacher_server.http.scoring import (
    HttpTeacher,
    DialectError,
    PromptScores,
    checked_int,
    score_prompts,
    token_prompts,
    token_text,
)
from teacher_server.errors import NotFound

NEG_INF_AS = -9999.0  # what vLLM sends for -inf (JSON has no infinity)
UNSUPPORTED = {
    "stream": "streaming is not served: send stream false",
    "echo": "echo is not served: the prompt's log-probabilities are in prompt_logprobs",
    "logprobs": "log-probabilities of generated tokens are not served (nothing is generated): use prompt_logprobs",
    "suffix": "suffix is not served",
    "best_of": "best_of is not served (nothing is generated)",
}


def models(teachers: list[HttpTeacher], created: int) -> dict:
    """GET /v1/models, in vLLM's shape (a LoRA teacher as vLLM lists a LoRA module: its base as
    parent); `owned_by` says what answers."""
    return {
        "object": "list",
        "data": [
            {
                "id": teacher.model,
                "object": "model",
                "created": created,
                "owned_by": "opd-teacher (scoring only: prompt_logprobs, same tokenizer, temperature 1)",
                "root": teacher.model_path,
                "parent": teacher.parent,
                "max_model_len": teacher.service.engine.max_sequence_length,
                "permission": [],
            }
            for teacher in teachers
        ],
    }


def _checked_request(body: dict, max_k: int) -> tuple[list, int]:
    """The prompts and K of a completions request, or the 4xx an OpenAI client expects (its
    `model` chose the teacher already: HttpFront.serving)."""
    for field, why in UNSUPPORTED.items():
        if body.get(field) not in (None, False):
            raise DialectError(why, field)
    if checked_int(body, "n", 1, 1) != 1:
        raise DialectError("n must be 1: nothing is sampled", "n")
    if body.get("max_tokens", 16) != 1:
        raise DialectError(
            f"max_tokens must be 1: this teacher scores prompts and generates nothing (got {body.get('max_tokens', 16)!r}"
            ", vLLM's default is 16); send max_tokens 1 with prompt_logprobs",
            "max_tokens",
        )
    if body.get("prompt_logprobs") is None:
        raise DialectError("prompt_logprobs is required: this teacher returns prompt log-probabilities only")
    top_k = checked_int(body, "prompt_logprobs", None, 0)
    if top_k > max_k:
        raise DialectError(
            f"Requested prompt logprobs of {top_k}, which is greater than max allowed: {max_k} (the teacher's --max-k)",
            "prompt_logprobs",
        )
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise DialectError(f"temperature must be a number between 0 and 2, got {temperature!r}", "temperature")
    return token_prompts(body.get("prompt"), "prompt"), top_k


class ModelNotFound(NotFound):
    """The request names another model: 404, as vLLM answers it."""

    param = "model"


async def completions(body: dict, teacher: HttpTeacher, tenant: str) -> dict[str, Any]:
    """POST /v1/completions."""
    prompts, top_k = _checked_request(body, teacher.service.max_k)
    scored = await score_prompts(teacher.service, tenant, prompts, [1] * len(prompts), top_k)
    choices = await asyncio.to_thread(_choices, scored, top_k, teacher.texts.get())  # large: off the event loop
    prompt_tokens = sum(len(tokens) for tokens in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": teacher.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    }


def _choices(scored: list[PromptScores], top_k: int, decoded: list[str]) -> list[dict]:
    return [
        {
            "index": index,
            "text": "",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": _prompt_logprobs(scores, top_k, decoded),
        }
        for index, scores in enumerate(scored)
    ]


def _prompt_logprobs(scores: PromptScores, top_k: int, decoded: list[str]) -> list[dict | None]:
    entries: list[dict | None] = [None]
    result = scores.result
    if result is None:
        return entries
    ids, logprobs = result.ids.tolist(), result.logprobs.tolist()
    actual_logprobs = result.token_logprobs.tolist()
    for row, target in enumerate(scores.tokens[scores.first :].tolist()):
        top = [(i, lp) for i, lp in zip(ids[row][:top_k], logprobs[row][:top_k]) if i >= 0]
        rank = next((place + 1 for place, (i, _) in enumerate(top) if i == target), len(top) + 1)
        entry = {str(target): _logprob(actual_logprobs[row], rank, token_text(decoded, target))}
        for place, (i, lp) in enumerate(top):
            entry[str(i)] = _logprob(lp, place + 1, token_text(decoded, i))
        entries.append(entry)
    return entries


def _logprob(value: float, rank: int, text: str) -> dict:
    return {"logprob": value if value > NEG_INF_AS else NEG_INF_AS, "rank": rank, "decoded_token": text}
