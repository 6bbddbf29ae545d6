"""Shared fixtures: the tiny teacher (testkit/tiny_model.py), SmolLM2 and a live teacher server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-teacher"))


class LiveServer:
    """A TeacherServer running on its own event loop in a background thread."""

    def __init__(self, config) -> None:
        from teacher_server.server import TeacherServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(TeacherServer, config))
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    @staticmethod
    async def _make(cls, config):
        return cls(config)

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def server_config(model: Path, **overrides):
    from teacher_server.engines import EngineConfig
    from teacher_server.server import ServerConfig

    engine_config = EngineConfig(model=str(model), chunk_size=overrides.pop("chunk_size", 16))
    return ServerConfig(
        engine_config=engine_config,
        host="127.0.0.1",
        port=overrides.pop("port", 0),
        max_k=overrides.pop("max_k", 32),
        grace_s=1.0,
        **overrides,
    )


@pytest.fixture(scope="session")
def live_server(tiny_model):
    server = LiveServer(server_config(tiny_model))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct in float32 (tests marked `real_model`)."""
    from testkit.real_model import missing_reason, smollm2_path

    reason = missing_reason()
    if reason:
        pytest.skip(f"real model unavailable: {reason}")
    return smollm2_path()
