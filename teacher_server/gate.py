"""One gate for every Teacher call: who is calling (API keys, auth.py) and whether the client
pinned the teacher this server serves (identity.py). Health and reflection stay open.

The check runs inside the RPC's own task (not in intercept_service), so the tenant it sets is
seen by the servicer and the tasks it starts; a refusal ends the call with its status.
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
        swapped = None if unauthenticated else pin_refusal(details, self.identity())

        def check() -> None:
            # A new exception per call: one kept in this closure would tie itself, its traceback
            # and the call's frames into a cycle that lingers until a full garbage collection.
            if unauthenticated is not None:
                raise Unauthenticated(unauthenticated)
            if swapped is not None:
                raise FailedPrecondition(swapped)
            set_current_tenant(tenant)

        return _checked(handler, check)


def _checked(handler: grpc.RpcMethodHandler, check: Callable[[], None]) -> grpc.RpcMethodHandler:
    """`handler` with `check()` first; the Teacher service has unary and bidirectional methods only."""

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
    raise TypeError(f"no gate for a {PROTECTED_PREFIX} method that is neither unary nor bidirectional")
