"""Maps exceptions raised inside RPC handlers to gRPC status codes.

Domain errors keep their own code and message; anything else is a bug, logged
with its traceback and reported as INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import grpc

from opd.metadata import RETRY_AFTER_MS
from opd.tensors import MalformedTensor
from teacher_server.errors import InvalidArgument, ResourceExhausted, TeacherError
from teacher_server.tenancy import current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)


# Longest status message sent: messages quote the request's values, and gRPC clients refuse
# trailing metadata past 16 KiB (as RESOURCE_EXHAUSTED, hiding the real error).
MAX_MESSAGE_CHARS = 1024


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, int]:
    """(status, message, retry hint in ms or 0) of an error raised while answering a request:
    the one mapping for unary calls (end_with_status), ScoreStream entries (servicer.py) and HTTP."""
    if isinstance(error, TeacherError):
        return error.code, _bounded(str(error)), error.retry_after_ms
    if isinstance(error, MalformedTensor):
        return grpc.StatusCode.INVALID_ARGUMENT, _bounded(f"malformed tensor: {error}"), 0
    log.error("unexpected error in a request", exc_info=error)
    message = f"internal error ({type(error).__name__}: {error}); see the teacher's log"
    return grpc.StatusCode.INTERNAL, _bounded(message), 0


def failed_request(error: BaseException) -> bool:
    """Whether `error` ends one request (answered with a status) rather than the server: every
    Exception, and the panics of Rust libraries (pyo3's PanicException derives from BaseException)."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def _bounded(message: str) -> str:
    """The message, its middle cut out if it is too long (the end often says what to do)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    cut = f" ... (cut: {len(message)} characters in all) ... "
    head = (MAX_MESSAGE_CHARS - len(cut)) * 3 // 4
    return message[:head] + cut + message[-(MAX_MESSAGE_CHARS - len(cut) - head) :]


def end_with_status(context: grpc.aio.ServicerContext, error: Exception) -> grpc.StatusCode:
    """Give the call `error`'s status; the handler then returns (no response message).

    Not context.abort(): its AbortError ties the call's state, the context and the
    handler's frames into a reference cycle, so every refused request (a server under a
    scan or a buggy client refuses thousands) stayed in memory until a full garbage
    collection, and the process grew with the rate of errors.
    """
    code, message, retry_after_ms = status_of(error)
    context.set_code(code)
    context.set_details(message)
    if retry_after_ms:
        context.set_trailing_metadata(((RETRY_AFTER_MS, str(retry_after_ms)),))
    return code


class RefusedRequest:
    """Stands in for a request message refused before it was parsed; handlers raise its error.
    It keeps the error's type and message, not an exception: one raised later would hold its
    traceback, and through it the frame holding this request, in a reference cycle."""

    def __init__(self, error: type[TeacherError], message: str) -> None:
        self.error, self.message = error, message


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, method: str, limit: int | None
) -> Callable[[bytes], Any] | None:
    """The deserializer, with a per-method size limit checked before parsing (gRPC's own receive
    limit is one for all methods, and a Score never needs the room of a tokenizer); gRPC reports a
    deserializer failure as UNKNOWN, we want INVALID_ARGUMENT with a message."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return RefusedRequest(
                ResourceExhausted,
                f"the {method} message is {len(data)} bytes, over this teacher's limit of {limit} for {method}; "
                "send a smaller request",
            )
        try:
            return deserializer(data)
        except Exception as error:
            why = f"{type(error).__name__}: {error}"[:200]
            return RefusedRequest(InvalidArgument, f"the request is not a valid protobuf message of this RPC ({why})")

    return deserialize


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, RefusedRequest):
        raise request.error(request.message)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Unary calls: a domain error becomes its status (with trailing metadata such as a
    retry hint), counted in the metrics. ScoreStream answers per-request errors in the
    stream itself; what ends a whole stream (an unparsable request) becomes a status too."""

    def __init__(
        self, metrics: "TeacherMetrics | None" = None, receive_limits: Mapping[str, int] | None = None
    ) -> None:
        self.metrics = metrics  # counts unary calls by method, tenant and status
        self.receive_limits = dict(receive_limits or {})  # bytes of one request message, by method name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rpartition("/")[2]
        options = dict(
            request_deserializer=_tolerant(handler.request_deserializer, method, self.receive_limits.get(method)),
            response_serializer=handler.response_serializer,
        )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_guarded_stream(handler.stream_stream), **options)
        if handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary
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
            except BaseException as error:
                if not failed_request(error):
                    raise
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
        except BaseException as error:
            if not failed_request(error):
                raise
            end_with_status(context, error)

    return guarded
