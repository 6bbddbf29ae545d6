"""Maps exceptions raised inside RPC handlers to gRPC status codes.

Domain errors keep their own code and message; anything else is a bug, logged
with its traceback and reported as INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import grpc

from opd.tensors import MalformedTensor
from teacher_server.errors import InvalidArgument, TeacherError
from teacher_server.tenancy import current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, TeacherError):
        return error.code, str(error)
    if isinstance(error, MalformedTensor):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed tensor: {error}"
    log.error("unexpected error in a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}: {error}); see the teacher's log"


def end_with_status(context: grpc.aio.ServicerContext, error: Exception) -> grpc.StatusCode:
    """Give the call `error`'s status; the handler then returns (no response message).

    Not context.abort(): its AbortError ties the call's state, the context and the
    handler's frames into a reference cycle, so every refused request (a server under a
    scan or a buggy client refuses thousands) stayed in memory until a full garbage
    collection, and the process grew with the rate of errors.
    """
    code, message = status_of(error)
    context.set_code(code)
    context.set_details(message)
    if isinstance(error, TeacherError) and error.trailing_metadata():
        context.set_trailing_metadata(error.trailing_metadata())
    return code


class MalformedRequest:
    """Stands in for a request message that did not parse; handlers turn it into INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"[:200]


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """gRPC reports a deserializer failure as UNKNOWN; we want INVALID_ARGUMENT with a message."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return MalformedRequest(error)

    return deserialize


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(f"the request is not a valid protobuf message of this RPC ({request.error})")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Unary calls: a domain error becomes its status (with trailing metadata such as a
    retry hint), counted in the metrics. ScoreStream answers per-request errors in the
    stream itself; what ends a whole stream (an unparsable request) becomes a status too."""

    def __init__(self, metrics: "TeacherMetrics | None" = None) -> None:
        self.metrics = metrics  # counts unary calls by method, tenant and status

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        options = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_guarded_stream(handler.stream_stream), **options)
        if handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary
        method = handler_call_details.method.rpartition("/")[2]
        metrics = self.metrics

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()

            def count(code: grpc.StatusCode) -> None:
                # Before the status leaves: a client that scrapes right after its call sees it counted.
                if metrics is not None:
                    metrics.request(current_tenant(), method, code.name, time.perf_counter() - started)

            try:
                _refuse_malformed(request)
                response = await behaviour(request, context)
            except grpc.aio.AbortError:
                count(grpc.StatusCode.UNKNOWN)  # aborted by the handler itself; not ours to name
                raise
            except Exception as error:
                code = end_with_status(context, error)
                count(code)
                return None
            count(grpc.StatusCode.OK)
            return response

        return grpc.unary_unary_rpc_method_handler(guarded, **options)


def _guarded_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def checked_requests(requests: Any):
        async for request in requests:
            _refuse_malformed(request)
            yield request

    async def guarded(requests: Any, context: grpc.aio.ServicerContext):
        try:
            async for reply in behaviour(checked_requests(requests), context):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            end_with_status(context, error)

    return guarded


def checked_handler(handler: grpc.RpcMethodHandler, check: Callable[[], None]) -> grpc.RpcMethodHandler:
    """`handler` with `check()` run first, inside the RPC's own task.

    Running there (not in intercept_service) matters: context variables that
    `check` sets (the tenant) are then seen by the servicer and by the tasks it
    starts. A TeacherError raised by `check` ends the call with its status, for
    unary and streaming calls alike.
    """

    def refused(context: grpc.aio.ServicerContext) -> bool:
        try:
            check()
        except TeacherError as error:
            end_with_status(context, error)
            return True
        return False

    options = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def checked_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return None if refused(context) else await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked_unary_unary, **options)
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        async def checked_stream_stream(requests: Any, context: grpc.aio.ServicerContext):
            if not refused(context):
                async for reply in stream_stream(requests, context):
                    yield reply

        return grpc.stream_stream_rpc_method_handler(checked_stream_stream, **options)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def checked_unary_stream(request: Any, context: grpc.aio.ServicerContext):
            if not refused(context):
                async for reply in unary_stream(request, context):
                    yield reply

        return grpc.unary_stream_rpc_method_handler(checked_unary_stream, **options)
    stream_unary = handler.stream_unary

    async def checked_stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return None if refused(context) else await stream_unary(requests, context)

    return grpc.stream_unary_rpc_method_handler(checked_stream_unary, **options)
