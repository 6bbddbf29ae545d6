"""What both HTTP dialects ask of the service: the teacher's scores of a token-id prompt.

Over HTTP the rollout is in the teacher's own vocabulary (same-tokenizer only: a student with
another tokenizer opens a gRPC session) and is scored at temperature 1, as vLLM and SGLang
score prompt tokens whatever the request's sampling temperature.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from teacher_server.alignment.result import ScoreResult
from teacher_server.errors import InvalidArgument
from teacher_server.service import ScoreInput, TeacherService
from teacher_server.sessions import SessionSettings

MAX_PROMPTS = 1024  # prompts in one request (vLLM's VLLM_MAX_COMPLETION_PROMPTS default)


class DialectError(InvalidArgument):
    """A request this dialect cannot answer; `param` names the field (OpenAI error bodies carry it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def token_prompts(value: Any, field: str) -> list[np.ndarray]:
    """A token-id prompt or a list of them, as int64 arrays (text prompts are refused: this teacher
    scores token ids, it does not tokenize)."""
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        prompts = value
    elif isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        prompts = [value]
    elif isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        raise DialectError(
            f"{field} is text; this teacher scores token ids only: send the rollout's token ids "
            "(a list of ints, or a list of such lists)",
            field,
        )
    else:
        raise DialectError(f"{field} must be a non-empty list of token ids or a list of such lists", field)
    if len(prompts) > MAX_PROMPTS:
        raise DialectError(f"{field} holds {len(prompts)} prompts, more than {MAX_PROMPTS} in one request", field)
    arrays = []
    for index, prompt in enumerate(prompts):
        if not prompt or not all(type(item) is int for item in prompt):
            raise DialectError(f"{field}[{index}] must be a non-empty list of integer token ids", field)
        arrays.append(np.asarray(prompt, dtype=np.int64))
    return arrays


def checked_int(body: dict, field: str, default: int | None, low: int, high: int | None = None) -> int | None:
    """body[field] as an int in [low, high], or `default` when absent or null."""
    value = body.get(field, default)
    if value is None:
        return default
    if type(value) is not int:
        raise DialectError(f"{field} must be an integer, got {value!r}", field)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise DialectError(f"{field} must be {bound}, got {value}", field)
    return value


@dataclass(frozen=True)
class PromptScores:
    """The teacher's scores of positions first .. N-1 of one prompt (`result` None when there are none)."""

    tokens: np.ndarray
    first: int
    result: ScoreResult | None


async def score_prompt(
    service: TeacherService,
    tenant: str,
    session_id: str,
    tokens: np.ndarray,
    first: int,
    top_k: int,
    requested: list[int] = (),
) -> PromptScores:
    """Score every position from `first` on (1 <= first), in the teacher's vocabulary at temperature 1,
    with the log-probabilities of the `requested` ids at each of them."""
    vocab_size = service.sessions.teacher.model_vocab_size
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DialectError(
            f"token id {bad} is out of vocabulary [0, {vocab_size}): over HTTP the rollout must be in the "
            "teacher's own vocabulary (a student with another tokenizer uses the gRPC sessions)"
        )
    if first >= len(tokens):
        return PromptScores(tokens, first, None)
    wanted = np.tile(np.asarray(requested, dtype=np.int64), (len(tokens) - first, 1)) if requested else None
    request = ScoreInput(session_id, tokens.astype(np.int32), first, max(top_k, 1), requested_ids=wanted)
    return PromptScores(tokens, first, await service.score(request, tenant))


async def score_prompts(
    service: TeacherService,
    tenant: str,
    prompts: list[np.ndarray],
    firsts: list[int],
    top_k: int,
    requested: list[int] = (),
) -> list[PromptScores]:
    """score_prompt for every prompt at once, so the scheduler batches them (with each other and with
    other tenants' work); if one is refused, the others are cancelled: their jobs leave the queue."""
    session_id = service.open_session(None, SessionSettings(), tenant).session_id  # the same one every time
    tasks = [
        asyncio.ensure_future(score_prompt(service, tenant, session_id, tokens, first, top_k, requested))
        for tokens, first in zip(prompts, firsts)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class TokenTexts:
    """The text of every teacher token id, decoded once (dialects may return it per entry)."""

    def __init__(self, tokenizer_path: str) -> None:
        self._path = tokenizer_path
        self._texts: list[str] | None = None
        self._lock = threading.Lock()

    def get(self) -> list[str]:
        with self._lock:
            if self._texts is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self._path)
                size = max(tokenizer.get_vocab().values()) + 1
                self._texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
            return self._texts


@dataclass
class HttpTeacher:
    """One hosted teacher as the dialects name it: `model` is the default teacher's model path (as
    vLLM names its model) and another teacher's name (as vLLM names a LoRA module)."""

    service: TeacherService
    model: str
    model_path: str
    tokenizer: str
    texts: TokenTexts
    parent: str | None = None  # an adapter's base, by its `model`


def token_text(decoded: list[str], token_id: int) -> str:
    return decoded[token_id] if token_id < len(decoded) else ""  # a padded lm-head row has no text
