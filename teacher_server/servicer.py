"""The gRPC servicer: protobuf in, domain objects to TeacherService, protobuf out.

It holds no logic of its own beyond the conversion and the streaming plumbing.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.errors import InvalidArgument, Unavailable
from teacher_server.interceptor import status_of
from teacher_server.service import ScoreInput, ScoreOutput, TeacherService
from teacher_server.sessions import StudentTokenizerSpec

# Requests of one ScoreStream being scored at once; the stream reads no further
# requests until one finishes (backpressure instead of unbounded memory).
MAX_IN_FLIGHT_PER_STREAM = 256


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    def __init__(self) -> None:
        self._service: TeacherService | None = None

    def set_service(self, service: TeacherService) -> None:
        self._service = service

    @property
    def service(self) -> TeacherService:
        if self._service is None:
            raise Unavailable("the teacher model is still loading; retry in a few seconds")
        return self._service

    async def GetInfo(self, request, context) -> teacher_pb2.GetInfoResponse:
        return self.service.info()

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
        session = self.service.open_session(student, request.temperature or 1.0)
        return teacher_pb2.OpenSessionResponse(
            session_id=session.session_id,
            same_as_teacher=session.same_as_teacher,
            student_vocab_size=session.student_vocab_size,
        )

    async def CloseSession(self, request, context) -> teacher_pb2.CloseSessionResponse:
        self.service.close_session(request.session_id)
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
            try:
                reply = teacher_pb2.ScoreStreamResponse(request_id=request.request_id, response=await self._score(request))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                code, message = status_of(error)
                reply = teacher_pb2.ScoreStreamResponse(
                    request_id=request.request_id, error=teacher_pb2.Error(code=code.value[0], message=message)
                )
            finally:
                slots.release()
            answers.put_nowait(reply)

        async def read_requests() -> None:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)
            answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # re-raises a failure of the request stream itself
        finally:
            # The client went away or the stream failed: stop every unfinished request,
            # which also drops its queued engine work.
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    async def _score(self, request: teacher_pb2.ScoreRequest) -> teacher_pb2.ScoreResponse:
        tokens = from_tensor(request.tokens, name="tokens", dtype="int32", ndim=1)
        output = await self.service.score(
            ScoreInput(
                session_id=request.session_id, tokens=tokens, score_from=request.score_from, top_k=request.top_k
            )
        )
        return _response(request.request_id, output)


def _response(request_id: int, output: ScoreOutput) -> teacher_pb2.ScoreResponse:
    return teacher_pb2.ScoreResponse(
        request_id=request_id,
        ids=to_tensor(output.ids),
        logprobs=to_tensor(output.logprobs),
        token_logprobs=to_tensor(output.token_logprobs),
        mask=to_tensor(output.mask),
        reason=to_tensor(output.reason),
        coverage=output.coverage,
        mean_support_mass=output.mean_support_mass,
    )
