"""Maps exceptions raised inside RPC handlers to gRPC status codes.

Domain errors keep their own code and message; anything else is a bug, logged
with its traceback and reported as INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc

from opd.tensors import MalformedTensor
from teacher_server.errors import TeacherError

log = logging.getLogger(__name__)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, TeacherError):
        return error.code, str(error)
    if isinstance(error, MalformedTensor):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed tensor: {error}"
    log.error("unexpected error in a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}: {error}); see the teacher's log"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming handlers report per-request errors themselves
        behaviour = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await context.abort(*status_of(error))

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
