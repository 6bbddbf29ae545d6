"""Fixtures shared by the trainer tests: a small student and a prompts file for the tiny teacher."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from teacher_server.scheduler import SchedulerLimits
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def deterministic_server(tiny_model):
    # One sequence per forward pass: the teacher's numbers then do not depend on
    # which requests happened to share a batch, so reruns are bitwise identical.
    server = LiveServer(server_config(tiny_model, limits=SchedulerLimits(max_batch_size=1)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    # Same tokenizer as the tiny teacher, a different and smaller random network.
    return build_tiny_model(tmp_path_factory.mktemp("student"), seed=1, hidden=32)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": " ".join(f"w{rng.randrange(90)}" for _ in range(5))}) for _ in range(64)]
    path.write_text("\n".join(lines) + "\n")
    return path
