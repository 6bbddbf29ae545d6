"""One gate for every Teacher call: who is calling (API keys, auth.py) and whether the client
pinned the teacher this server serves (identity.py). Health and reflection stay open.

Both are decided from the call's metadata, before its request is read: a refused call ends with
its status and its message is never received whole. The tenant is set inside the RPC's own task
(not in intercept_service), so the servicer and the tasks it starts see it.

The gate also bounds the Teacher calls in progress, per tenant and in all, with RESOURCE_EXHAUSTED
and a retry hint. gRPC's own bound (`maximum_concurrent_rpcs`) is only a backstop above it: of
904 ScoreStreams it refused, grpcio's asyncio client saw 901 as INTERNAL.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

import grpc

from opd.metadata import PROTECTED_PREFIX
from teacher_server.auth import ApiKeys, Authenticator
from teacher_server.errors import FailedPrecondition, ResourceExhausted, TeacherError, Unauthenticated
from teacher_server.identity import TeacherIdentity, pinned_teacher, set_current_pin
from teacher_server.interceptor import end_with_status
from teacher_server.tenancy import set_current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

MAX_CALLS_IN_PROGRESS = 4096  # Teacher calls over all connections and tenants
MAX_TENANT_CALLS = 1024  # ... and of one tenant, so that one tenant cannot hold every slot


class CallsInProgress:
    """Teacher calls from their handler's start to its end, in all and per tenant. Only the event
    loop's thread touches it (handlers and interceptors run there)."""

    def __init__(self, max_calls: int, max_tenant_calls: int) -> None:
        self.max_calls, self.max_tenant_calls = max_calls, max_tenant_calls
        self.total = 0
        self.by_tenant: Counter[str] = Counter()

    def refusal(self, tenant: str) -> str | None:
        """Why a new call of `tenant` must wait, or None."""
        if self.by_tenant[tenant] >= self.max_tenant_calls:
            return f"tenant {tenant!r} has {self.by_tenant[tenant]} calls in progress, its limit; retry shortly"
        if self.total >= self.max_calls:
            return f"{self.total} calls are in progress on this teacher, its limit; retry shortly"
        return None

    @contextmanager
    def held(self, tenant: str) -> Iterator[None]:
        self.total += 1
        self.by_tenant[tenant] += 1
        try:
            yield
        finally:
            self.total -= 1
            self.by_tenant[tenant] -= 1
            if not self.by_tenant[tenant]:
                del self.by_tenant[tenant]


class GateInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        keys: ApiKeys | None,
        identities: Callable[[], tuple[TeacherIdentity, ...] | None],
        metrics: TeacherMetrics | None = None,
        max_calls: int = MAX_CALLS_IN_PROGRESS,
        max_tenant_calls: int = MAX_TENANT_CALLS,
    ) -> None:
        self.authenticator = Authenticator(keys, metrics)
        self.identities = identities
        self.calls = CallsInProgress(max_calls, max_tenant_calls)

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
            return _refused(handler, lambda: Unauthenticated(unauthenticated))
        pinned, swapped = pinned_teacher(details, self.identities())
        if swapped is not None:
            return _refused(handler, lambda: FailedPrecondition(swapped))
        busy = self.calls.refusal(tenant)
        if busy is not None:
            return _refused(handler, lambda: ResourceExhausted(busy, retry_after_s=1.0))
        return _checked(handler, tenant, pinned, self.calls)


def _refused(handler: grpc.RpcMethodHandler, error: Callable[[], TeacherError]) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `error` without reading its request: a streaming handler
    is given the request only as it reads it, so a refused client's message (up to the receive
    limit) is never received whole, let alone parsed."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        # A new exception per call: one kept in a closure would tie itself, its traceback and the
        # call's frames into a cycle that lingers until a full garbage collection.
        end_with_status(context, error())

    if handler.unary_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext):
        end_with_status(context, error())
        return
        yield  # a generator: the bidirectional method's shape

    return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)


def _checked(
    handler: grpc.RpcMethodHandler, tenant: str, pinned: TeacherIdentity | None, calls: CallsInProgress
) -> grpc.RpcMethodHandler:
    """`handler` run as `tenant` pinned to `pinned`, inside the RPC's own task, counted in `calls`
    while it runs; the Teacher service has unary and bidirectional methods only."""

    options = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def checked_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            set_current_tenant(tenant)
            set_current_pin(pinned)
            with calls.held(tenant):
                return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked_unary_unary, **options)
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        async def checked_stream_stream(requests: Any, context: grpc.aio.ServicerContext):
            set_current_tenant(tenant)
            set_current_pin(pinned)
            with calls.held(tenant):
                async for reply in stream_stream(requests, context):
                    yield reply

        return grpc.stream_stream_rpc_method_handler(checked_stream_stream, **options)
    raise TypeError(f"no gate for a {PROTECTED_PREFIX} method that is neither unary nor bidirectional")
