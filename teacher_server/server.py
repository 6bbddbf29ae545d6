"""Assemble and run the gRPC server: servicer, interceptor, health, reflection.

The port opens first and health reports NOT_SERVING while the model loads, so
an orchestrator can tell "starting" from "dead"; SERVING is set only once the
engine has loaded. SIGTERM/SIGINT drain: health goes NOT_SERVING, new RPCs are
refused, in-flight ones get `grace_s` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.engines import EngineConfig, load_engine
from teacher_server.interceptor import StatusInterceptor
from teacher_server.scheduler import Scheduler, SchedulerLimits
from teacher_server.service import TeacherService
from teacher_server.servicer import TeacherServicer
from teacher_server.sessions import TeacherVocabulary

log = logging.getLogger(__name__)

SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name


@dataclass(frozen=True)
class ServerConfig:
    engine: str = "hf"
    engine_config: EngineConfig = EngineConfig(model="")
    tokenizer: str | None = None  # defaults to the model path
    host: str = "127.0.0.1"
    port: int = 50051
    max_k: int = 64
    limits: SchedulerLimits = SchedulerLimits()
    max_message_bytes: int = 256 * 1024 * 1024
    grace_s: float = 30.0


class TeacherServer:
    """A running teacher: `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.servicer = TeacherServicer()
        self.health = health.aio.HealthServicer()
        self.scheduler: Scheduler | None = None
        self.port: int | None = None
        self._server = grpc.aio.server(
            interceptors=[StatusInterceptor()],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        teacher_pb2_grpc.add_TeacherServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)

    async def start(self) -> None:
        """Open the port, load the model, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._server.start()
        log.info("listening on %s:%d, loading %s", self.config.host, self.port, self.config.engine_config.model)
        engine = await asyncio.to_thread(load_engine, self.config.engine, self.config.engine_config)
        teacher = await asyncio.to_thread(
            TeacherVocabulary.from_pretrained,
            self.config.tokenizer or self.config.engine_config.model,
            engine.vocab_size,
        )
        self.scheduler = Scheduler(engine, self.config.limits)
        self.scheduler.start()
        self.servicer.set_service(TeacherService(engine, teacher, self.scheduler, self.config.max_k))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s with the %s engine", engine.model_name, engine.name)

    async def stop(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(self.config.grace_s)
        if self.scheduler is not None:
            await self.scheduler.stop()

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
    log.info("draining: refusing new requests, giving in-flight ones %.0f s", config.grace_s)
    await server.stop()
