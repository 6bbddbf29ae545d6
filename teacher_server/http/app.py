"""The HTTP server: routes of both dialects, keys, limits, errors, health and drain.

Keys are the gRPC tenants' keys (--api-keys), sent as `Authorization: Bearer KEY` or as the
password of HTTP Basic auth (`http://TENANT:KEY@host:port`: TRL's VLLMClient takes a URL but
sends no header). Every route but the health checks needs one. Domain errors map onto the
status codes an HTTP client of either dialect expects (STATUS), with the same messages as
over gRPC; bodies over --max-request-bytes are refused before they are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from teacher_server import __version__
from teacher_server.auth import Authenticator
from teacher_server.errors import TeacherError, Unavailable
from teacher_server.http import sglang_dialect, vllm_dialect
from teacher_server.http.scoring import DialectError, HttpTeacher
from teacher_server.interceptor import failed_request, status_of
from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)

# gRPC status of a domain error -> HTTP status. RESOURCE_EXHAUSTED with a retry hint is 429 (a
# busy server), without one 413 (a request over a limit: it will never be accepted).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
HEALTH_PATHS = ("/health", "/health_generate")


class RequestTooLarge(TeacherError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class HttpFront:
    """What the routes need: the teachers (none while the models load), keys, metrics."""

    authenticator: Authenticator
    metrics: TeacherMetrics | None
    max_request_bytes: int
    teachers: dict[str, HttpTeacher] = field(default_factory=dict)  # by `model`, the default first
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))

    def serving(self, model: str | None = None) -> HttpTeacher:
        """The teacher a request's `model` names (None: the default one)."""
        if self.draining:
            raise Unavailable("the teacher is shutting down; retry on another replica")
        if not self.teachers:
            raise Unavailable("the teacher is loading its model; retry in a few seconds")
        if model is None:
            return next(iter(self.teachers.values()))
        named = self.teachers.get(model) or next((t for t in self.teachers.values() if t.service.name == model), None)
        if named is None:
            served = ", ".join(f"`{name}`" for name in self.teachers)
            raise vllm_dialect.ModelNotFound(
                f"The model `{model}` does not exist; this teacher serves {served} (GET /v1/models)"
            )
        return named


def http_app(front: HttpFront) -> Starlette:
    async def health(request: Request) -> Response:
        ok = bool(front.teachers) and not front.draining
        return Response(status_code=200 if ok else 503)

    async def version(request: Request, tenant: str) -> Any:
        return {"version": __version__}

    async def models(request: Request, tenant: str) -> Any:
        front.serving()
        return vllm_dialect.models(list(front.teachers.values()), front.started)

    async def completions(request: Request, tenant: str) -> Any:
        body = await _json_body(request, front.max_request_bytes)
        return await vllm_dialect.completions(body, front.serving(_named(body, "model")), tenant)

    async def generate(request: Request, tenant: str) -> Any:
        body = await _json_body(request, front.max_request_bytes)
        # SGLang picks a LoRA adapter by `lora_path`; `model` is accepted too.
        named = _named(body, "lora_path") or _named(body, "model")
        return await sglang_dialect.generate(body, front.serving(named), tenant)

    async def model_info(request: Request, tenant: str) -> Any:
        default = front.serving()
        return sglang_dialect.model_info(default.model, default.tokenizer)

    routes = [Route(path, health, methods=["GET"]) for path in HEALTH_PATHS]
    routes += [
        Route(path, _handler(front, path, handler, dialect), methods=[method])
        for path, method, handler, dialect in (
            ("/version", "GET", version, "openai"),
            ("/v1/models", "GET", models, "openai"),
            ("/v1/completions", "POST", completions, "openai"),
            ("/generate", "POST", generate, "sglang"),
            ("/get_model_info", "GET", model_info, "sglang"),
            ("/model_info", "GET", model_info, "sglang"),
        )
    ]
    return Starlette(routes=routes)


Handler = Callable[[Request, str], Awaitable[Any]]


def _named(body: Any, field_name: str) -> str | None:
    """A request's teacher by `field_name` (None: not named); a body that is not an object is the
    dialect's to refuse."""
    value = body.get(field_name) if isinstance(body, dict) else None
    if value is not None and not isinstance(value, str):
        raise DialectError(f"{field_name} must be a string naming a model (GET /v1/models)", field_name)
    return value


def _handler(front: HttpFront, path: str, handler: Handler, dialect: str) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, answer, map errors to the dialect's error body; count the request."""

    async def endpoint(request: Request) -> Response:
        started, tenant = time.perf_counter(), ""
        try:
            tenant, refused = front.authenticator.tenant_of(
                _request_key(request),
                f"HTTP {path}",
                "no API key: send 'Authorization: Bearer <key>' or put it in the URL as "
                "http://TENANT:KEY@host:port (HTTP Basic auth)",
            )
            if refused:
                response = _error(401, refused, dialect, None)
            else:
                answer = await handler(request, tenant)
                # K entries per position: encoded off the event loop, which keeps serving meanwhile.
                response = Response(await asyncio.to_thread(orjson.dumps, answer), media_type="application/json")
        except BaseException as error:  # every domain error is the client's answer, never a crash
            if not failed_request(error):
                raise
            response = _error_response(error, dialect)
        if front.metrics is not None:
            front.metrics.request(
                tenant or "-", f"HTTP {path}", str(response.status_code), time.perf_counter() - started
            )
        return response

    return endpoint


def _request_key(request: Request) -> str | None:
    """The key of a Bearer header, or the password of a Basic one."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


async def _json_body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body has {declared} bytes, over this teacher's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is over this teacher's limit of {limit} bytes")
    try:
        parsed = orjson.loads(bytes(body))
    except orjson.JSONDecodeError as error:
        raise DialectError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise DialectError("the request body must be a JSON object")
    return parsed


def _error_response(error: Exception, dialect: str) -> Response:
    code, message, retry_after_ms = status_of(error)
    status = STATUS.get(code, 500)
    if status == 429 and not retry_after_ms:  # a limit no retry passes (RequestTooLarge among them)
        status = 413
    response = _error(status, message, dialect, getattr(error, "param", None))
    if retry_after_ms:
        response.headers["retry-after"] = str(max(1, round(retry_after_ms / 1000)))
    return response


def _error(status: int, message: str, dialect: str, param: str | None) -> Response:
    """OpenAI's error object for the vLLM dialect, SGLang's {"error": {"message"}} for its own."""
    if dialect == "openai":
        kind = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 413: "BadRequestError"}
        error = {"message": message, "type": kind.get(status, "ServerError"), "param": param, "code": status}
    else:
        error = {"message": message}
    return Response(orjson.dumps({"error": error}), status_code=status, media_type="application/json")


class HttpServer:
    """uvicorn serving `http_app` on the teacher's event loop. Not uvicorn's `serve()`: it would take
    the process's signals, which belong to the teacher's drain (server.py) of both front ends."""

    def __init__(self, front: HttpFront, host: str, port: int, tls: TlsFiles | None = None) -> None:
        tls = tls or TlsFiles()
        self.config = uvicorn.Config(
            http_app(front),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls.cert,
            ssl_keyfile=tls.key,
            ssl_ca_certs=tls.client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(self.config)
        self._ticks: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen (the port answers at once: health says 503 until the model is loaded)."""
        self.config.load()
        self._server.lifespan = self.config.lifespan_class(self.config)
        try:
            await self._server.startup()
        except SystemExit:  # uvicorn's answer to a port it cannot bind, after logging why
            raise RuntimeError(f"cannot serve HTTP on {self.config.host}:{self.config.port}") from None
        self._ticks = asyncio.create_task(self._server.main_loop())
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop listening; answers still being written get up to `grace_s`."""
        self.config.timeout_graceful_shutdown = max(1, round(grace_s))
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await self._server.shutdown()


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None  # clients must present a certificate signed by it (mTLS)
