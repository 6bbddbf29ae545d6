"""Client of the teacher service: async core, sync wrapper for training loops.

The trainer talks to the teacher only through the opd.v1 stubs wrapped here.
`AsyncTeacherClient.score_many` sends a batch of rollouts over ScoreStreams, many
requests in flight, answers matched by request id.

Several teachers: `target` is one address, a comma-separated list, or a list.
Each entry gets its own channel (an "endpoint") and the rollouts of a batch are
split over the endpoints that are up; when one fails, its share moves to the
others. An entry may itself be load-balanced by gRPC, e.g.
`dns:///teacher.ns.svc:50051` (every address behind the name, round_robin).

Failures that cost time, never a step (retried with jittered exponential backoff,
up to `RetryPolicy.attempts` tries and `max_elapsed_s`): UNAVAILABLE (teacher down,
restarting or draining: the endpoint rests for the backoff while others work;
also CANCELLED, which a call racing a teacher's shutdown can get, and the INTERNAL that
grpc's own client reports for a connection broken mid-call, LOCAL_CORE_INTERNAL);
RESOURCE_EXHAUSTED that carries the server's retry hint (a tenant limit: wait that
long); DEADLINE_EXCEEDED (`timeout_s` bounds one call or stream: a stream that timed
out on a busy teacher resends only its unanswered requests); NOT_FOUND for the session (the teacher restarted and forgot it: re-open it
transparently; on a load-balanced endpoint a re-open may land on another replica
than the failed call, so each further NOT_FOUND re-opens once more, reaching
every replica within a few tries). Anything else is the caller's bug and raises.

Security: `api_key` is sent as `authorization: Bearer <key>` with every call;
`tls` (TlsOptions) switches to TLS, with a client certificate for mutual TLS.
`pin_teacher` refuses a teacher whose model or weights changed (identity.py on
the server): True pins what the first GetInfo reports, a string pins that.

A server may host several teachers (GetInfo.teachers): `teacher` names the one this
client's session scores with ("" the server's default); a trainer with several teachers
holds one client per teacher.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Coroutine, Sequence, TypeVar

import grpc
import numpy as np

from opd.metadata import AUTHORIZATION, PIN
from opd.tensors import to_tensor
from opd.v1 import teacher_pb2
from student_trainer.channels import (
    SERVICE_CONFIG,
    Endpoint,
    RetryPolicy,
    TlsOptions,
    is_loopback,
    retry_after,
    split_targets,
)
from student_trainer.messages import TeacherScores

log = logging.getLogger(__name__)
T = TypeVar("T")

# The status grpc's aio client sets itself when an operation of a call fails in its own core, e.g.
# a stream write to a teacher that was killed mid-call (grpc _AioCall.set_internal_error). The
# teacher never sent it (its INTERNAL names an exception), so it is a broken connection: retried.
LOCAL_CORE_INTERNAL = "Internal error from Core"
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class TeacherRequestError(RuntimeError):
    """The teacher rejected a request; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class _Failure:
    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None  # the server's hint (RESOURCE_EXHAUSTED from a limit)


class AsyncTeacherClient:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = 256 * 1024 * 1024,
        api_key: str | None = None,
        tls: TlsOptions | None = None,
        pin_teacher: bool | str = False,
        teacher: str = "",
    ) -> None:
        targets = split_targets(target)
        self.teacher = teacher
        self.target = ",".join(targets)
        self.timeout_s = timeout_s
        self.retry = retry
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", SERVICE_CONFIG),
            # Reconnect to a restarted teacher within ~2 s, not gRPC's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.endpoints = [Endpoint(t, options, tls) for t in targets]
        if api_key and tls is None and not all(is_loopback(t) for t in targets):
            log.warning("sending the teacher API key without TLS to %s; use TLS outside a trusted network", self.target)
        self._auth = ((AUTHORIZATION, f"Bearer {api_key}"),) if api_key else ()
        self._pin_wanted = pin_teacher
        self.pin: str | None = pin_teacher if isinstance(pin_teacher, str) and pin_teacher else None
        # Jitter from a private generator: the trainer's RNG state (saved in checkpoints) must
        # not depend on how often the teacher failed.
        self._rng = random.Random()
        self._request_ids = itertools.count(1)
        self._turn = itertools.count()
        self._session_request: teacher_pb2.OpenSessionRequest | None = None
        self.session_id: str | None = None

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self._auth + (((PIN, self.pin),) if self.pin else ())

    async def close(self) -> None:
        await asyncio.gather(*(endpoint.channel.close() for endpoint in self.endpoints))

    async def get_info(self) -> teacher_pb2.GetInfoResponse:
        info = await self._unary(
            lambda endpoint: endpoint.stub.GetInfo(
                teacher_pb2.GetInfoRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        )
        if self._pin_wanted is True and self.pin is None:
            named = [t for t in info.teachers if t.name == self.teacher]
            hosted = named[0] if named else info  # an older server, or the default teacher
            self.pin = f"{hosted.model}@{hosted.weights_sha256}"
            log.info("pinned the teacher %s", self.pin)
        return info

    async def open_session(
        self, tokenizer: teacher_pb2.HFTokenizer | None = None, temperature: float = 1.0, **session_options
    ) -> str:
        """Open the session used by later score calls (None = the teacher's own tokenizer).

        `session_options`: further OpenSessionRequest fields, e.g.
        special_token_pairs=[teacher_pb2.SpecialTokenPair(...)], no_eos_pairing=True,
        no_special_token_masking=True, alignment=teacher_pb2.AlignmentOptions(...).
        """
        student = (
            teacher_pb2.StudentTokenizer(same_as_teacher=True)
            if tokenizer is None
            else teacher_pb2.StudentTokenizer(hf=tokenizer)
        )
        if self._pin_wanted is True and self.pin is None:
            await self.get_info()
        self._session_request = teacher_pb2.OpenSessionRequest(
            tokenizer=student, temperature=temperature, teacher=self.teacher, **session_options
        )
        for endpoint in self.endpoints:
            endpoint.session_open = False
        # Open it wherever the teacher is up now; endpoints that are down open it on first use.
        await self._unary(self._ensure_session)
        for endpoint in self.endpoints:
            if not endpoint.session_open and endpoint.resting_until <= time.monotonic():
                try:
                    await self._ensure_session(endpoint)
                except grpc.aio.AioRpcError as error:
                    self._rest(endpoint, _Failure(error.code(), error.details()), 0)
        return self.session_id

    async def _ensure_session(self, endpoint: Endpoint) -> str:
        if self._session_request is None:
            raise RuntimeError("call open_session() before scoring")
        if not endpoint.session_open:
            for _ in range(endpoint.open_calls):
                response = await endpoint.stub.OpenSession(
                    self._session_request, timeout=self.timeout_s, metadata=self._metadata
                )
            if self.session_id not in (None, response.session_id):
                # Content-addressed ids are the same on every replica of the same teacher.
                log.warning("teacher %s gave another session id; is it another teacher?", endpoint.target)
            self.session_id = response.session_id
            endpoint.session_open = True
        return self.session_id

    async def score(
        self,
        tokens: Sequence[int],
        score_from: int,
        top_k: int,
        messages: Sequence[tuple[str, str]] = (),
        candidate_ids: np.ndarray | None = None,
    ) -> TeacherScores:
        """One rollout over the unary RPC; `messages`: the prompt as (role, content) chat messages;
        `candidate_ids` [P, M]: ids whose teacher log-probabilities come back too (pad -1)."""

        async def call(endpoint: Endpoint) -> TeacherScores:
            await self._ensure_session(endpoint)
            request = self._request(tokens, score_from, top_k, messages, candidate_ids)
            reply = await endpoint.stub.Score(request, timeout=self.timeout_s, metadata=self._metadata)
            endpoint.open_calls = 1
            return TeacherScores.from_proto(reply)

        return await self._unary(call)

    async def score_many(self, rollouts: Sequence[tuple], top_k: int) -> list[TeacherScores]:
        """Score (tokens, score_from) pairs over ScoreStreams, split over the endpoints; results in input order.

        A rollout may be (tokens, score_from, messages): the prompt as chat messages too,
        (tokens, score_from, messages, candidate_ids): ids [P, M] scored whatever the top-K, and
        (tokens, score_from, messages, candidate_ids, score_mask): uint8 [P], 0 at context the
        student did not write (multi-turn rollouts). None stands for an absent element.
        """
        if self.session_id is None:
            raise RuntimeError("call open_session() before scoring")
        results: dict[int, TeacherScores] = {}
        todo = list(range(len(rollouts)))
        started, attempt = time.monotonic(), 0
        while todo:
            endpoints = await self._available()
            shares = [todo[i :: len(endpoints)] for i in range(len(endpoints))]
            failures = await asyncio.gather(
                *(
                    self._stream_once(endpoint, rollouts, share, top_k, results)
                    for endpoint, share in zip(endpoints, shares)
                )
            )
            remaining = [index for index in todo if index not in results]
            progress = len(remaining) < len(todo)
            todo = remaining
            if not todo:
                break
            if progress:  # the budget is for a teacher that does not come back, not for a long batch
                started, attempt = time.monotonic(), 0
            else:
                attempt += 1
            for endpoint, failure in zip(endpoints, failures):
                if failure is not None:
                    self._recover(endpoint, failure, attempt, started)
        return [results[index] for index in range(len(rollouts))]

    async def _stream_once(
        self,
        endpoint: Endpoint,
        rollouts: Sequence[tuple[Sequence[int], int]],
        todo: list[int],
        top_k: int,
        results: dict[int, TeacherScores],
    ) -> _Failure | None:
        """Send `todo` on a fresh stream to `endpoint`, filling `results`; return the first failure seen."""
        if not todo:
            return None
        first_failure: _Failure | None = None
        try:
            await self._ensure_session(endpoint)
            index_of, requests = {}, []
            for index in todo:
                request = self._request(*rollouts[index][:2], top_k, *rollouts[index][2:5])
                index_of[request.request_id] = index
                requests.append(request)
            stream = endpoint.stub.ScoreStream(iter(requests), timeout=self.timeout_s, metadata=self._metadata)
            async for reply in stream:
                if reply.HasField("response"):
                    results[index_of[reply.request_id]] = TeacherScores.from_proto(reply.response)
                elif first_failure is None:
                    hint = reply.error.retry_after_ms / 1000 if reply.error.retry_after_ms else None
                    first_failure = _Failure(_STATUS_BY_NUMBER[reply.error.code], reply.error.message, hint)
        except grpc.aio.AioRpcError as error:
            first_failure = first_failure or _Failure(error.code(), error.details(), retry_after(error))
        if first_failure is None and any(index not in results for index in todo):
            first_failure = _Failure(grpc.StatusCode.UNKNOWN, "the stream ended before every request was answered")
        if first_failure is None:
            endpoint.open_calls = 1
        return first_failure

    async def _unary(self, call):
        """`call(endpoint)` on the next available endpoint, retried as the module docstring says."""
        started = time.monotonic()
        for attempt in itertools.count():
            endpoint = (await self._available())[0]
            try:
                return await call(endpoint)
            except grpc.aio.AioRpcError as error:
                self._recover(endpoint, _Failure(error.code(), error.details(), retry_after(error)), attempt, started)

    async def _available(self) -> list[Endpoint]:
        """Endpoints not resting, in turn order; waits for the first to wake up when all rest."""
        now = time.monotonic()
        awake = [e for e in self.endpoints if e.resting_until <= now]
        if not awake:
            first = min(self.endpoints, key=lambda e: e.resting_until)
            await asyncio.sleep(first.resting_until - now)
            awake = [first]
        shift = next(self._turn) % len(awake)  # rotate, so single calls spread over endpoints
        return awake[shift:] + awake[:shift]

    def _recover(self, endpoint: Endpoint, failure: _Failure, attempt: int, started: float) -> None:
        """Get ready to retry after `failure`, or raise if it is not transient (or we waited long enough)."""
        code, message = failure.code, failure.message
        if code == grpc.StatusCode.NOT_FOUND and "session" in message and self._session_request is not None:
            log.warning("teacher %s lost the session (restart?); re-opening it", endpoint.target)
            endpoint.session_open = False
            endpoint.open_calls = min(endpoint.open_calls + 1, 16)
        elif (
            code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
            or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and failure.retry_after_s is not None)
            or (code == grpc.StatusCode.INTERNAL and message == LOCAL_CORE_INTERNAL)
        ):
            # The endpoint rests for the backoff below; a restarted teacher answers NOT_FOUND next.
            # CANCELLED: this client never cancels its own calls, so it is a teacher closing its port.
            pass
        else:
            raise TeacherRequestError(code, message)
        elapsed = time.monotonic() - started
        if attempt + 1 >= self.retry.attempts or elapsed > self.retry.max_elapsed_s:
            raise TeacherRequestError(code, f"{message} (gave up after {attempt + 1} attempts, {elapsed:.0f} s)")
        self._rest(endpoint, failure, attempt)

    def _rest(self, endpoint: Endpoint, failure: _Failure, attempt: int) -> None:
        delay = self.retry.delay(attempt, self._rng)
        if failure.retry_after_s is not None:
            delay = max(delay, failure.retry_after_s * self._rng.uniform(1.0, 1.5))
        if failure.code == grpc.StatusCode.NOT_FOUND:
            delay = 0.0  # nothing to wait for: re-open and retry now
        else:
            log.warning(
                "teacher %s %s: %s; retrying in %.1fs", endpoint.target, failure.code.name, failure.message, delay
            )
        endpoint.resting_until = time.monotonic() + delay

    def _request(
        self,
        tokens: Sequence[int],
        score_from: int,
        top_k: int,
        messages: Sequence[tuple[str, str]] | None = (),
        candidate_ids: np.ndarray | None = None,
        score_mask: np.ndarray | None = None,
    ) -> teacher_pb2.ScoreRequest:
        return teacher_pb2.ScoreRequest(
            request_id=next(self._request_ids),
            session_id=self.session_id,
            tokens=to_tensor(np.asarray(tokens, dtype=np.int32)),
            score_from=score_from,
            top_k=top_k,
            messages=[teacher_pb2.ChatMessage(role=role, content=content) for role, content in messages or ()],
            candidate_ids=None if candidate_ids is None else to_tensor(np.asarray(candidate_ids, dtype=np.int32)),
            score_mask=None if score_mask is None else to_tensor(np.asarray(score_mask, dtype=np.uint8)),
        )

    async def session_stats(self) -> teacher_pb2.SessionStats:
        """Coverage totals of this session on one teacher replica (GetSessionStats)."""

        async def call(endpoint: Endpoint) -> teacher_pb2.SessionStats:
            await self._ensure_session(endpoint)
            request = teacher_pb2.GetSessionStatsRequest(session_id=self.session_id)
            return await endpoint.stub.GetSessionStats(request, timeout=self.timeout_s, metadata=self._metadata)

        return await self._unary(call)


class TeacherClient:
    """Blocking facade over AsyncTeacherClient, for plain training loops.

    The async client lives on its own event loop in a background thread, so the
    caller needs no asyncio and many requests still travel concurrently.
    """

    def __init__(self, target: str | Sequence[str], **options) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        self._client: AsyncTeacherClient = self._run(self._make(target, options))

    async def _make(self, target, options: dict) -> AsyncTeacherClient:
        return AsyncTeacherClient(target, **options)

    def _run(self, coroutine: Coroutine[None, None, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def session_id(self) -> str | None:
        return self._client.session_id

    @property
    def pin(self) -> str | None:
        return self._client.pin

    def get_info(self) -> teacher_pb2.GetInfoResponse:
        return self._run(self._client.get_info())

    def open_session(
        self, tokenizer: teacher_pb2.HFTokenizer | None = None, temperature: float = 1.0, **session_options
    ) -> str:
        return self._run(self._client.open_session(tokenizer, temperature, **session_options))

    def score(
        self, tokens: Sequence[int], score_from: int, top_k: int, messages: Sequence[tuple[str, str]] = ()
    ) -> TeacherScores:
        return self._run(self._client.score(tokens, score_from, top_k, messages))

    def session_stats(self) -> teacher_pb2.SessionStats:
        return self._run(self._client.session_stats())

    def submit_score_many(self, rollouts: Sequence[tuple[Sequence[int], int]], top_k: int) -> Future:
        """score_many without waiting: a Future of its result (the trainer samples meanwhile)."""
        return asyncio.run_coroutine_threadsafe(self._client.score_many(rollouts, top_k), self._loop)

    def score_many(self, rollouts: Sequence[tuple[Sequence[int], int]], top_k: int) -> list[TeacherScores]:
        return self.submit_score_many(rollouts, top_k).result()

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
