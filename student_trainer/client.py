"""Client of the teacher service: async core, sync wrapper for training loops.

The trainer talks to the teacher only through the opd.v1 stubs wrapped here.
`AsyncTeacherClient.score_many` sends a batch of rollouts over one ScoreStream,
many requests in flight, answers matched by request id. Transient failures
(UNAVAILABLE, and a session the server no longer knows after a restart) are
retried with jittered exponential backoff and a transparent re-open, so a
teacher restart costs time, not a training step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
from dataclasses import dataclass
from typing import Coroutine, Sequence, TypeVar

import grpc
import numpy as np

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class TeacherRequestError(RuntimeError):
    """The teacher rejected a request; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's answer for one rollout; row p is position score_from + p."""

    ids: np.ndarray  # int32 [P, K], student vocabulary, pad -1
    logprobs: np.ndarray  # float32 [P, K], pad -inf
    token_logprobs: np.ndarray  # float32 [P]
    mask: np.ndarray  # uint8 [P]
    reason: np.ndarray  # uint8 [P]
    coverage: float
    mean_support_mass: float

    @classmethod
    def from_proto(cls, response: teacher_pb2.ScoreResponse) -> "TeacherScores":
        return cls(
            ids=from_tensor(response.ids, name="ids", dtype="int32", ndim=2),
            logprobs=from_tensor(response.logprobs, name="logprobs", dtype="float32", ndim=2),
            token_logprobs=from_tensor(response.token_logprobs, name="token_logprobs", dtype="float32", ndim=1),
            mask=from_tensor(response.mask, name="mask", dtype="uint8", ndim=1),
            reason=from_tensor(response.reason, name="reason", dtype="uint8", ndim=1),
            coverage=response.coverage,
            mean_support_mass=response.mean_support_mass,
        )


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.max_backoff_s, self.initial_backoff_s * 2**attempt)


class AsyncTeacherClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = teacher_pb2_grpc.TeacherStub(self._channel)
        self._request_ids = itertools.count(1)
        self._session_request: teacher_pb2.OpenSessionRequest | None = None
        self.session_id: str | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def get_info(self) -> teacher_pb2.GetInfoResponse:
        return await self._with_retries(lambda: self._stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=self.timeout_s))

    async def open_session(
        self, tokenizer: teacher_pb2.HFTokenizer | None = None, temperature: float = 1.0
    ) -> str:
        """Open the session used by later score calls (None = the teacher's own tokenizer)."""
        student = (
            teacher_pb2.StudentTokenizer(same_as_teacher=True)
            if tokenizer is None
            else teacher_pb2.StudentTokenizer(hf=tokenizer)
        )
        self._session_request = teacher_pb2.OpenSessionRequest(tokenizer=student, temperature=temperature)
        return await self._reopen_session()

    async def _reopen_session(self) -> str:
        if self._session_request is None:
            raise RuntimeError("call open_session() before scoring")
        response = await self._with_retries(
            lambda: self._stub.OpenSession(self._session_request, timeout=self.timeout_s)
        )
        self.session_id = response.session_id
        return self.session_id

    async def score(self, tokens: Sequence[int], score_from: int, top_k: int) -> TeacherScores:
        """One rollout over the unary RPC."""
        if self.session_id is None:
            await self._reopen_session()
        for attempt in itertools.count():
            request = self._request(tokens, score_from, top_k)
            try:
                return TeacherScores.from_proto(await self._stub.Score(request, timeout=self.timeout_s))
            except grpc.aio.AioRpcError as error:
                await self._recover(error.code(), error.details(), attempt)

    async def score_many(self, rollouts: Sequence[tuple[Sequence[int], int]], top_k: int) -> list[TeacherScores]:
        """Score (tokens, score_from) pairs over one ScoreStream; results in input order."""
        if self.session_id is None:
            await self._reopen_session()
        results: dict[int, TeacherScores] = {}
        todo = list(range(len(rollouts)))
        for attempt in itertools.count():
            failures = await self._stream_once(rollouts, todo, top_k, results)
            todo = [index for index in todo if index not in results]
            if not todo:
                return [results[index] for index in range(len(rollouts))]
            code, message = failures
            await self._recover(code, message, attempt)
        raise AssertionError("unreachable")

    async def _stream_once(
        self,
        rollouts: Sequence[tuple[Sequence[int], int]],
        todo: list[int],
        top_k: int,
        results: dict[int, TeacherScores],
    ) -> tuple[grpc.StatusCode, str]:
        """Send `todo` on a fresh stream, filling `results`; return the first failure seen."""
        index_of = {}
        requests = []
        for index in todo:
            request = self._request(rollouts[index][0], rollouts[index][1], top_k)
            index_of[request.request_id] = index
            requests.append(request)
        first_failure: tuple[grpc.StatusCode, str] | None = None
        try:
            async for reply in self._stub.ScoreStream(iter(requests), timeout=self.timeout_s):
                if reply.HasField("response"):
                    results[index_of[reply.request_id]] = TeacherScores.from_proto(reply.response)
                elif first_failure is None:
                    first_failure = (_STATUS_BY_NUMBER[reply.error.code], reply.error.message)
        except grpc.aio.AioRpcError as error:
            first_failure = first_failure or (error.code(), error.details())
        return first_failure or (grpc.StatusCode.UNKNOWN, "the stream ended before every request was answered")

    async def _recover(self, code: grpc.StatusCode, message: str, attempt: int) -> None:
        """Get ready to retry after a failure, or raise if it is not transient."""
        if code == grpc.StatusCode.NOT_FOUND and "session" in message and self._session_request is not None:
            log.warning("teacher lost the session (restart?); re-opening it")
        elif code not in RETRYABLE:
            raise TeacherRequestError(code, message)
        if attempt + 1 >= self.retry.attempts:
            raise TeacherRequestError(code, f"{message} (gave up after {attempt + 1} attempts)")
        delay = self.retry.delay(attempt)
        log.warning("teacher %s: %s; retrying in %.1fs", code.name, message, delay)
        await asyncio.sleep(delay)
        if code == grpc.StatusCode.NOT_FOUND:
            await self._reopen_session()

    async def _with_retries(self, call):
        for attempt in itertools.count():
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt + 1 >= self.retry.attempts:
                    raise TeacherRequestError(error.code(), error.details()) from None
                await asyncio.sleep(self.retry.delay(attempt))

    def _request(self, tokens: Sequence[int], score_from: int, top_k: int) -> teacher_pb2.ScoreRequest:
        return teacher_pb2.ScoreRequest(
            request_id=next(self._request_ids),
            session_id=self.session_id,
            tokens=to_tensor(np.asarray(tokens, dtype=np.int32)),
            score_from=score_from,
            top_k=top_k,
        )


class TeacherClient:
    """Blocking facade over AsyncTeacherClient, for plain training loops.

    The async client lives on its own event loop in a background thread, so the
    caller needs no asyncio and many requests still travel concurrently.
    """

    def __init__(self, target: str, **options) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        self._client: AsyncTeacherClient = self._run(self._make(target, options))

    async def _make(self, target: str, options: dict) -> AsyncTeacherClient:
        return AsyncTeacherClient(target, **options)

    def _run(self, coroutine: Coroutine[None, None, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def session_id(self) -> str | None:
        return self._client.session_id

    def get_info(self) -> teacher_pb2.GetInfoResponse:
        return self._run(self._client.get_info())

    def open_session(self, tokenizer: teacher_pb2.HFTokenizer | None = None, temperature: float = 1.0) -> str:
        return self._run(self._client.open_session(tokenizer, temperature))

    def score(self, tokens: Sequence[int], score_from: int, top_k: int) -> TeacherScores:
        return self._run(self._client.score(tokens, score_from, top_k))

    def score_many(self, rollouts: Sequence[tuple[Sequence[int], int]], top_k: int) -> list[TeacherScores]:
        return self._run(self._client.score_many(rollouts, top_k))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tokenizer_message(tokenizer) -> teacher_pb2.HFTokenizer:
    """Describe a transformers fast tokenizer for OpenSession.

    The server recognises the teacher's own tokenizer from this and then scores
    with exact identity alignment.
    """
    return teacher_pb2.HFTokenizer(
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        special_tokens=list(tokenizer.all_special_tokens),
        eos_tokens=[tokenizer.eos_token] if tokenizer.eos_token else [],
        chat_template=tokenizer.chat_template or "",
    )
