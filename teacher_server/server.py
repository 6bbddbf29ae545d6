"""Assemble and run the gRPC server: servicer, interceptors, health, reflection, metrics.

The port opens first and health reports NOT_SERVING while the model loads, so
an orchestrator can tell "starting" from "dead"; SERVING is set only once the
engine has loaded.

Interceptors, outermost first: auth (API key -> tenant; auth.py), pin (refuse a
client pinned to other weights; identity.py), status (domain errors -> codes).
Health and reflection are never behind a key.

SIGTERM/SIGINT drain: health goes NOT_SERVING, new score requests get UNAVAILABLE
(also on streams already open), every accepted request is still scored and
answered (within `grace_s`), then the port closes and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.alignment.cross import MAX_ALIGNMENT_WORK
from teacher_server.auth import ApiKeys, Authenticator
from teacher_server.engines import EngineConfig
from teacher_server.gate import MAX_CALLS_IN_PROGRESS, MAX_TENANT_CALLS, GateInterceptor
from teacher_server.http.app import HttpFront, HttpServer, TlsFiles
from teacher_server.http.scoring import HttpTeacher, TokenTexts
from teacher_server.identity import TeacherIdentity
from teacher_server.interceptor import StatusInterceptor
from teacher_server.metrics import TeacherMetrics
from teacher_server.scheduler import Scheduler, SchedulerLimits
from teacher_server.service import TeacherService, receive_limits
from teacher_server.servicer import TeacherServicer
from teacher_server.sessions import MAX_TABLE_BYTES, SessionRegistry
from teacher_server.teacher_specs import DEFAULT_TEACHER, TeacherSpec
from teacher_server.teachers import LoadedTeacher, Teachers, load_teachers
from teacher_server.tenancy import MAX_TENANT_TABLE_BYTES, SessionOwners

log = logging.getLogger(__name__)

SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name
# gRPC's own bounds sit this many times above the gate's calls in progress (gate.py answers
# RESOURCE_EXHAUSTED): streams past them on one connection are refused by HTTP/2 (UNAVAILABLE, safe
# to retry), and calls past the pending bound would be cancelled by gRPC before the gate sees them.
GRPC_BOUNDS_FACTOR = 4


@dataclass(frozen=True)
class ServerConfig:
    engine: str = "hf"
    engine_config: EngineConfig = EngineConfig(model="")  # the engine options of every teacher
    tokenizer: str | None = None  # defaults to the model path
    # Several teachers (teacher_specs.py); empty: the one teacher engine_config.model, named "default".
    teachers: tuple[TeacherSpec, ...] = ()
    default_teacher: str = ""  # the teacher of an OpenSession that names none ("": the first)
    host: str = "127.0.0.1"
    port: int = 50051
    max_k: int = 64
    limits: SchedulerLimits = SchedulerLimits()
    max_message_bytes: int = 256 * 1024 * 1024  # largest response
    max_request_bytes: int = 64 * 1024 * 1024  # largest request (a tokenizer.json of a big vocabulary fits)
    max_calls: int = MAX_CALLS_IN_PROGRESS  # Teacher calls in progress over all connections
    max_tenant_calls: int = MAX_TENANT_CALLS  # ... of one tenant
    grace_s: float = 30.0
    # Tenants: None serves everyone as one open tenant (and says so at start-up).
    api_keys: ApiKeys | None = None
    max_sessions_per_tenant: int = 64
    # Memory of session tables (the student's side of each tokenizer pair), in all and per tenant.
    max_table_mib: int = MAX_TABLE_BYTES >> 20
    max_tenant_table_mib: int = MAX_TENANT_TABLE_BYTES >> 20
    # Scored positions of one cross-tokenizer request, at the default alignment options (cross.py).
    max_alignment_work: int = MAX_ALIGNMENT_WORK
    # TLS: cert + key; with client_ca, clients must present a certificate signed by it (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Prometheus /metrics over HTTP; None: not served. Loopback unless exposed on purpose: the
    # metrics name tenants and their traffic, the model's path and its weights hash.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # The HTTP front end (vLLM's and SGLang's dialects, http/); None: not served. 0 picks a free port.
    http_port: int | None = None

    def teacher_specs(self) -> tuple[TeacherSpec, ...]:
        if self.teachers:
            return self.teachers
        return (TeacherSpec(name=DEFAULT_TEACHER, model=self.engine_config.model, tokenizer=self.tokenizer),)


class TeacherServer:
    """A running teacher: `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: ServerConfig) -> None:
        if bool(config.tls_cert) != bool(config.tls_key) or (config.tls_client_ca and not config.tls_cert):
            raise ValueError("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
        self.config = config
        self.metrics = TeacherMetrics()
        self.servicer = TeacherServicer(self.metrics)
        self.health = health.aio.HealthServicer()
        self.scheduler: Scheduler | None = None
        self.identities: tuple[TeacherIdentity, ...] | None = None  # None while the models load
        self.teachers: Teachers | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self.http_port: int | None = None
        self.http_front = HttpFront(
            Authenticator(config.api_keys, self.metrics), self.metrics, config.max_request_bytes
        )
        if config.http_port is not None:
            tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            self.http = HttpServer(self.http_front, config.host, config.http_port, tls)
        grpc_bound = GRPC_BOUNDS_FACTOR * max(config.max_calls, MAX_CALLS_IN_PROGRESS)
        self._server = grpc.aio.server(
            interceptors=[
                GateInterceptor(
                    config.api_keys, lambda: self.identities, self.metrics, config.max_calls, config.max_tenant_calls
                ),
                StatusInterceptor(
                    self.metrics,
                    receive_limits(config.limits.max_request_tokens, config.max_k, config.max_request_bytes),
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", grpc_bound),
                ("grpc.server.max_pending_requests", grpc_bound),
                ("grpc.server.max_pending_requests_hard_limit", grpc_bound),
            ],
            # Counts calls still receiving their request too, which the gate does not see.
            maximum_concurrent_rpcs=2 * config.max_calls,
        )
        teacher_pb2_grpc.add_TeacherServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)

    async def start(self) -> None:
        """Open the port, load the model, then report SERVING."""
        config = self.config
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            self.port = self._server.add_secure_port(address, _server_credentials(config))
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port)
        await self._server.start()
        transport = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
        names = ", ".join(
            f"{spec.name}={spec.model or spec.base + '+' + spec.adapter}" for spec in config.teacher_specs()
        )
        log.info("listening on %s:%d (%s), loading %s", config.host, self.port, transport, names)
        if self.http is not None:
            self.http_port = await self.http.start()
            log.info("HTTP (vLLM and SGLang dialects) on %s:%d (%s)", config.host, self.http_port, transport)
        if config.api_keys is None:
            # Once, here, and loudly: an open teacher is fine on a laptop, not on a shared network.
            log.warning(
                "NO AUTHENTICATION: started without --api-keys, so anyone who can reach %s:%d can use this "
                "teacher, as one shared tenant. Pass --api-keys FILE (one 'TENANT KEY' per line) to require keys.",
                config.host,
                self.port,
            )
        else:
            tenants = config.api_keys.tenants
            log.info("API keys required; %d tenant(s): %s", len(tenants), ", ".join(tenants))
        specs = config.teacher_specs()
        loaded = await asyncio.to_thread(load_teachers, specs, config.engine, config.engine_config)
        teachers = self._services(loaded)
        # The teachers' side of cross-tokenizer alignment (byte tables, chat rendering) is built once
        # per tokenizer, here, rather than by the first cross-tokenizer OpenSession: its latency and
        # memory are the deployment's, not the first tenant's.
        for service in {id(s.sessions): s for s in teachers.by_name.values()}.values():
            try:
                await asyncio.to_thread(service.sessions.teacher_text)
            except Exception:  # an odd tokenizer must not stop a teacher that may only serve its own
                log.exception(
                    "building teacher %r's side of cross-tokenizer alignment failed; the first such session retries",
                    service.name,
                )
        self.servicer.set_teachers(teachers)
        self.http_front.teachers = _http_teachers(teachers, specs)
        if self.http is not None:  # decoded once, here, not on the event loop by a first request
            for texts in {id(t.texts): t.texts for t in self.http_front.teachers.values()}.values():
                await asyncio.to_thread(texts.get)
        self.teachers, self.identities = teachers, teachers.identities()
        for teacher in loaded:
            self.metrics.teacher(
                teacher.name,
                teacher.engine.model_name,
                teacher.engine.name,
                teacher.weights_sha256,
                teacher.spec.base,
                teacher.memory_bytes,
            )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        for teacher in loaded:
            log.info(
                "serving teacher %r: %s (weights sha256 %s) with the %s engine",
                teacher.name,
                teacher.engine.model_name,
                teacher.weights_sha256[:16] or "n/a",
                teacher.engine.name,
            )

    def _services(self, loaded: list[LoadedTeacher]) -> Teachers:
        """One service per teacher, one scheduler for the device they share; teachers of one
        tokenizer (a base and its adapters) share their sessions' registry."""
        config = self.config
        self.scheduler = Scheduler(loaded[0].engine, config.limits, self.metrics)
        self.scheduler.start()
        owners = SessionOwners(config.max_sessions_per_tenant, config.max_tenant_table_mib << 20)
        registries: dict[int, SessionRegistry] = {}
        services = []
        for teacher in loaded:
            service = TeacherService(
                teacher.engine,
                teacher.vocabulary,
                self.scheduler,
                config.max_k,
                owners,
                teacher.weights_sha256,
                self.metrics,
                max_table_bytes=config.max_table_mib << 20,
                max_alignment_work=config.max_alignment_work,
                name=teacher.name,
                base=teacher.spec.base,
                sessions=registries.get(id(teacher.vocabulary)),
            )
            registries.setdefault(id(teacher.vocabulary), service.sessions)
            services.append(service)
        return Teachers(services, config.default_teacher or loaded[0].name)

    async def stop(self) -> None:
        """Drain, then stop: accepted requests are answered, new ones get UNAVAILABLE."""
        started = time.monotonic()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.http_front.draining = True
        self.metrics.draining.set(1)
        if self.scheduler is not None:
            self.scheduler.drain()
            if await self.scheduler.wait_idle(self.config.grace_s):
                stats = self.scheduler.stats
                log.info(
                    "drained: every accepted request was answered "
                    "(%d accepted, %d scored, %d dropped by their callers)",
                    stats.jobs_accepted,
                    stats.jobs_scored,
                    stats.jobs_dropped,
                )
            else:
                log.warning("drain: accepted requests still running after %.0f s; cancelling them", self.config.grace_s)
        # Answers of finished jobs may still be on their way out: give RPCs the rest of the grace.
        rest = max(0.5, self.config.grace_s - (time.monotonic() - started))
        if self.http is not None:
            await asyncio.gather(self._server.stop(rest), self.http.stop(rest))
        else:
            await self._server.stop(rest)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.teachers is not None:
            self.teachers.shutdown()
        self.metrics.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    server = TeacherServer(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    await stopping.wait()
    log.info(
        "draining: health NOT_SERVING, refusing new requests, finishing accepted ones (up to %.0f s)", config.grace_s
    )
    await server.stop()
    log.info("drained; exiting")


def _http_teachers(teachers: Teachers, specs: tuple[TeacherSpec, ...]) -> dict[str, HttpTeacher]:
    """The teachers as the HTTP dialects name them (HttpTeacher), the default one first; teachers
    of one tokenizer share its decoded texts."""
    by_name = {spec.name: spec for spec in specs}
    texts: dict[str, TokenTexts] = {}
    served: dict[str, HttpTeacher] = {}
    ordered = [teachers.named("")] + [s for s in teachers.by_name.values() if s.name != teachers.default]
    for service in ordered:
        spec = by_name[service.name]
        root = by_name[spec.base] if spec.is_adapter else spec
        tokenizer = root.tokenizer or root.model
        model = service.engine.model_name if service.name == teachers.default else service.name
        parent = None
        if spec.is_adapter:
            parent = root.model if root.name == teachers.default else root.name
        served[model] = HttpTeacher(
            service,
            model,
            service.engine.model_name,
            tokenizer,
            texts.setdefault(tokenizer, TokenTexts(tokenizer)),
            parent,
        )
    return served


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
