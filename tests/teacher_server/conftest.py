"""Fixtures of the teacher-server tests: a live server's channel and stub, a session, an in-process
engine and a float64 reference on the same tiny model."""

from __future__ import annotations

import grpc
import pytest

from opd.v1 import teacher_pb2_grpc
from teacher_server.engines import EngineConfig
from teacher_server.engines.hf import HFEngine
from tests.helpers import open_same_as_teacher


@pytest.fixture(scope="module")
def channel(live_server):
    with grpc.insecure_channel(live_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> teacher_pb2_grpc.TeacherStub:
    return teacher_pb2_grpc.TeacherStub(channel)


@pytest.fixture(scope="module")
def session_id(stub) -> str:
    return open_same_as_teacher(stub)


@pytest.fixture(scope="module")
def engine(tiny_model) -> HFEngine:
    """An in-process engine on the same model, for comparison with the service."""
    return HFEngine(EngineConfig(model=str(tiny_model), chunk_size=16))


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64).eval()
