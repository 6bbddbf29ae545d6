"""The gRPC servicer: protobuf in, domain objects to TeacherService, protobuf out.

It holds no logic of its own beyond the conversion and the streaming plumbing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, AsyncIterator

import grpc
import numpy as np

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.alignment.cross import CrossOptions
from teacher_server.alignment.result import Coverage, ScoreResult
from teacher_server.errors import InvalidArgument, Unavailable
from teacher_server.identity import current_pin
from teacher_server.interceptor import failed_request, status_of
from teacher_server.service import ScoreInput, TeacherInfo, TeacherService
from teacher_server.sessions import SessionSettings
from teacher_server.student_tokenizer import StudentTokenizerSpec
from teacher_server.teachers import Teachers
from teacher_server.tenancy import current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

# Requests of one ScoreStream being scored or waiting to be sent; the stream reads no
# further requests until an answer has been handed to gRPC (backpressure instead of
# unbounded memory, also when the client reads its answers slowly).
MAX_IN_FLIGHT_PER_STREAM = 256
OPENING_THREADS = 16  # OpenSessions in progress (most wait for the tokenizer worker, sandbox.py)


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    def __init__(self, metrics: TeacherMetrics | None = None) -> None:
        self._teachers: Teachers | None = None
        self.metrics = metrics
        self._opening = ThreadPoolExecutor(OPENING_THREADS, thread_name_prefix="open-session")

    def set_teachers(self, teachers: Teachers) -> None:
        self._teachers = teachers

    @property
    def teachers(self) -> Teachers:
        if self._teachers is None:
            raise Unavailable("the teacher models are still loading; retry in a few seconds")
        return self._teachers

    def _of_session(self, session_id: str) -> TeacherService:
        service = self.teachers.holding(session_id)
        self.teachers.check_pin(service, current_pin())
        return service

    async def GetInfo(self, request, context) -> teacher_pb2.GetInfoResponse:
        teachers = self.teachers
        default = dataclasses.asdict(teachers.named("").info())
        del default["name"], default["base"]
        return teacher_pb2.GetInfoResponse(
            **default,
            teachers=[teacher_pb2.TeacherInfo(**_hosted(s.info())) for s in teachers.by_name.values()],
            default_teacher=teachers.default,
        )

    async def OpenSession(self, request: teacher_pb2.OpenSessionRequest, context) -> teacher_pb2.OpenSessionResponse:
        tokenizer = request.tokenizer
        if tokenizer.same_as_teacher == tokenizer.HasField("hf"):
            raise InvalidArgument("set exactly one of tokenizer.same_as_teacher and tokenizer.hf")
        student = None
        if tokenizer.HasField("hf"):
            student = StudentTokenizerSpec(
                tokenizer_json=tokenizer.hf.tokenizer_json,
                special_tokens=tuple(tokenizer.hf.special_tokens),
                eos_tokens=tuple(tokenizer.hf.eos_tokens),
                chat_template=tokenizer.hf.chat_template,
            )
        settings = SessionSettings(
            temperature=request.temperature or 1.0,
            special_token_pairs=tuple((p.student_token, p.teacher_token) for p in request.special_token_pairs),
            pair_eos=not request.no_eos_pairing,
            mask_specials=not request.no_special_token_masking,
            options=_alignment_options(request.alignment),
        )
        service = self.teachers.named(request.teacher)
        self.teachers.check_pin(service, current_pin())
        # A new student tokenizer is read in a worker process (seconds); the thread waiting for it
        # is one of the pool's own, so waiting builds never hold the threads requests align in.
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self._opening, service.open_session, student, settings, current_tenant())
        return teacher_pb2.OpenSessionResponse(
            session_id=session.session_id,
            teacher=service.name,
            same_as_teacher=session.same_as_teacher,
            student_vocab_size=session.student_vocab_size,
            special_token_pairs=[
                teacher_pb2.SpecialTokenPair(student_token=a, teacher_token=b) for a, b in session.special_token_pairs
            ],
        )

    async def GetSessionStats(self, request, context) -> teacher_pb2.SessionStats:
        requests, totals = self.teachers.holding(request.session_id).session_stats(request.session_id, current_tenant())
        return teacher_pb2.SessionStats(
            session_id=request.session_id,
            requests=requests,
            totals=_coverage(totals),
            coverage=totals.coverage,
            mean_retained_mass=totals.mean_retained_mass,
        )

    async def CloseSession(self, request, context) -> teacher_pb2.CloseSessionResponse:
        self.teachers.holding(request.session_id).close_session(request.session_id, current_tenant())
        return teacher_pb2.CloseSessionResponse()

    async def Score(self, request: teacher_pb2.ScoreRequest, context) -> teacher_pb2.ScoreResponse:
        return await self._score(request)

    async def ScoreStream(
        self, requests: AsyncIterator[teacher_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[teacher_pb2.ScoreStreamResponse]:
        answers: asyncio.Queue[teacher_pb2.ScoreStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        in_flight: set[asyncio.Task] = set()

        async def answer(request: teacher_pb2.ScoreRequest) -> None:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                reply = teacher_pb2.ScoreStreamResponse(
                    request_id=request.request_id, response=await self._score(request)
                )
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException as error:
                if not failed_request(error):
                    raise
                code, message, retry_after_ms = status_of(error)
                reply = teacher_pb2.ScoreStreamResponse(
                    request_id=request.request_id,
                    error=teacher_pb2.Error(code=code.value[0], message=message, retry_after_ms=retry_after_ms),
                )
            finally:
                if self.metrics is not None:
                    self.metrics.request(current_tenant(), "ScoreStream", code.name, time.perf_counter() - started)
            answers.put_nowait(reply)

        async def read_requests() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
            finally:
                # Also when the request stream fails (an unparsable message): the loop below
                # must not wait for answers that will never come.
                answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
                slots.release()
            await reader  # re-raises a failure of the request stream itself
        finally:
            # The client went away or the stream failed: stop every unfinished request,
            # which also drops its queued engine work.
            reader.cancel()
            for task in list(in_flight):
                task.cancel()
            # A failure re-raised above holds this frame in its traceback, and the task holds
            # the failure: without this the pair lingers until a full garbage collection.
            del reader

    async def _score(self, request: teacher_pb2.ScoreRequest) -> teacher_pb2.ScoreResponse:
        tokens = from_tensor(request.tokens, name="tokens", dtype="int32", ndim=1)
        messages = request.messages
        teacher_prompt = None
        if request.HasField("teacher_prompt_ids"):
            teacher_prompt = from_tensor(request.teacher_prompt_ids, name="teacher_prompt_ids", dtype="int32", ndim=1)
        service = self._of_session(request.session_id)
        # Before the messages become Python objects: a million of them take seconds to convert.
        service.validate_size(
            len(tokens) + (0 if teacher_prompt is None else len(teacher_prompt)),
            len(messages),
            lambda: sum(len(m.role) + len(m.content) for m in messages),
        )
        score_mask = None
        if request.HasField("score_mask"):
            score_mask = from_tensor(request.score_mask, name="score_mask", dtype="uint8", ndim=1)
        candidates = None
        if request.HasField("candidate_ids"):
            candidates = from_tensor(request.candidate_ids, name="candidate_ids", dtype="int32", ndim=2)
        tenant = current_tenant()
        result = await service.score(
            ScoreInput(
                session_id=request.session_id,
                tokens=tokens,
                score_from=request.score_from,
                top_k=request.top_k,
                messages=tuple((m.role, m.content) for m in messages),
                requested_ids=None if candidates is None else candidates.astype(np.int64),
                teacher_prompt_ids=None if teacher_prompt is None else teacher_prompt.astype(np.int64),
                score_mask=score_mask,
            ),
            tenant,
        )
        if self.metrics is not None:
            self.metrics.score_quality(tenant, result.counts.coverage, result.counts.mean_retained_mass)
        return _response(request.request_id, result)


def _response(request_id: int, result: ScoreResult) -> teacher_pb2.ScoreResponse:
    return teacher_pb2.ScoreResponse(
        request_id=request_id,
        ids=to_tensor(result.ids),
        logprobs=to_tensor(result.logprobs),
        token_logprobs=to_tensor(result.token_logprobs),
        mask=to_tensor(result.mask),
        reason=to_tensor(result.reason),
        coverage=result.counts.coverage,
        mean_support_mass=result.counts.mean_retained_mass,
        counts=_coverage(result.counts),
        candidate_logprobs=None if result.requested_logprobs is None else to_tensor(result.requested_logprobs),
    )


def _hosted(info: TeacherInfo) -> dict:
    """A TeacherInfo's fields for teacher_pb2.TeacherInfo (the server's version is GetInfo's own)."""
    fields = dataclasses.asdict(info)
    del fields["server_version"]
    return fields


def _coverage(counts: Coverage) -> teacher_pb2.Coverage:
    return teacher_pb2.Coverage(**{name: getattr(counts, name) for name in Coverage.__dataclass_fields__})


def _alignment_options(message: teacher_pb2.AlignmentOptions) -> CrossOptions:
    return CrossOptions.requested(
        candidates=message.candidates,
        inside_candidates=message.inside_candidates,
        rounds=message.expansion_rounds,
        branch_token_factor=message.branch_token_factor,
        min_branch_prob=message.min_branch_prob,
    )
