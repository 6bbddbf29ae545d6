"""One gate for every Teacher call: who is calling (API keys, auth.py) and whether the client
pinned the teacher this server serves (identity.py). Health and reflection stay open.

Both are decided from the call's metadata, before its request is read: a refused call ends with
its status and its message is never received whole. The tenant is set inside the RPC's own task
(not in intercept_service), so the servicer and the tasks it starts see it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

import grpc

from opd.metadata import PROTECTED_PREFIX
from teacher_server.auth import ApiKeys, Authenticator
from teacher_server.errors import FailedPrecondition, TeacherError, Unauthenticated
from teacher_server.identity import TeacherIdentity, pin_refusal
from teacher_server.interceptor import end_with_status
from teacher_server.tenancy import set_current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics


class GateInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        keys: ApiKeys | None,
        identity: Callable[[], TeacherIdentity | None],
        metrics: TeacherMetrics | None = None,
    ) -> None:
        self.authenticator = Authenticator(keys, metrics)
        self.identity = identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler  # health, reflection, unknown methods (UNIMPLEMENTED)
        tenant, unauthenticated = self.authenticator.authenticate(details)
        if unauthenticated is not None:
            return _refused(handler, Unauthenticated, unauthenticated)
        swapped = pin_refusal(details, self.identity())
        if swapped is not None:
            return _refused(handler, FailedPrecondition, swapped)
        return _checked(handler, lambda: set_current_tenant(tenant))


def _refused(handler: grpc.RpcMethodHandler, error: type[TeacherError], message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `error` without reading its request: a streaming handler
    is given the request only as it reads it, so a refused client's message (up to the receive
    limit) is never received whole, let alone parsed."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        # A new exception per call: one kept in a closure would tie itself, its traceback and the
        # call's frames into a cycle that lingers until a full garbage collection.
        end_with_status(context, error(message))

    if handler.unary_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext):
        end_with_status(context, error(message))
        return
        yield  # a generator: the bidirectional method's shape

    return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)


def _checked(handler: grpc.RpcMethodHandler, check: Callable[[], None]) -> grpc.RpcMethodHandler:
    """`handler` with `check()` (which sets the tenant) first, inside the RPC's own task; the Teacher
    service has unary and bidirectional methods only."""

    options = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def checked_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            check()
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked_unary_unary, **options)
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        async def checked_stream_stream(requests: Any, context: grpc.aio.ServicerContext):
            check()
            async for reply in stream_stream(requests, context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(checked_stream_stream, **options)
    raise TypeError(f"no gate for a {PROTECTED_PREFIX} method that is neither unary nor bidirectional")
