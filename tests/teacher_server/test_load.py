"""Load and fairness on loopback: 16 clients in 4 tenants, and a tenant flooding the queue.

The teacher runs as a subprocess (`opd-teacher serve`, torch on one thread) so the
clients in this process do not share its interpreter; all traffic goes to
127.0.0.1, every loop is bounded in requests and time. The figures are printed
(pytest -s) for the issue note:

* equal demand: 16 clients (4 per tenant; the tenants use 1, 2, 3 and 4 sessions),
  200 requests each over ScoreStreams with 8 in flight per client; 0 errors, and
  Jain's fairness index of the tenants' throughput over the window in which all
  four still have work, >= 0.95;
* flooding: one tenant keeps 4 x 32 requests in flight while a light tenant sends
  one request at a time; the light tenant's median latency stays within 3x of its
  median without the flood (measured in the same run, alternating with the flood
  paused).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest
import requests

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.launch import free_port
from tests.helpers import start_teacher

ROOT = Path(__file__).resolve().parents[2]
TENANTS = ["t0", "t1", "t2", "t3"]
LIGHT = "light"
KEYS = {tenant: secrets.token_hex(16) for tenant in [*TENANTS, LIGHT]}
SEQUENCE, SCORE_FROM, TOP_K = 24, 8, 8


class Teacher(NamedTuple):
    target: str  # gRPC
    http_base: str


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    keys = tmp / "keys.txt"
    keys.write_text("".join(f"{tenant} {key}\n" for tenant, key in KEYS.items()))
    # Small batches: a light tenant's request waits for the batch already on the device,
    # so the batch size bounds its latency under load (the scheduler bounds the rest).
    http_port = free_port()
    process = start_teacher(
        tiny_model,
        tmp,
        "--api-keys",
        str(keys),
        "--max-batch-size",
        "1",
        "--log-level",
        "WARNING",
        "--http-port",
        str(http_port),
    )
    yield Teacher(process.target, f"http://127.0.0.1:{http_port}")
    process.close(timeout_s=60)
    assert process.returncode == 0, process.log_path.read_text()[-3000:]


def metadata(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]


def metadata_header(tenant: str) -> dict[str, str]:
    return dict(metadata(tenant))


def request(session_id: str, rng: np.random.Generator, request_id: int = 0) -> teacher_pb2.ScoreRequest:
    tokens = rng.integers(4, 96, size=SEQUENCE).astype(np.int32)
    return teacher_pb2.ScoreRequest(
        request_id=request_id, session_id=session_id, tokens=to_tensor(tokens), score_from=SCORE_FROM, top_k=TOP_K
    )


async def open_sessions(stub, tenant: str, count: int) -> list[str]:
    sessions = []
    for index in range(count):  # distinct temperatures: distinct sessions
        opened = await stub.OpenSession(
            teacher_pb2.OpenSessionRequest(
                tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True), temperature=1.0 + index / 10
            ),
            metadata=metadata(tenant),
            timeout=30,
        )
        sessions.append(opened.session_id)
    return sessions


async def windowed_stream(
    stub, tenant: str, sessions: list[str], count: int, window: int, seed: int, on_answer
) -> list[int]:
    """`count` requests over one ScoreStream with at most `window` unanswered; returns error codes."""
    rng = np.random.default_rng(seed)
    slots = asyncio.Semaphore(window)
    errors: list[int] = []

    async def requests():
        for index in range(count):
            await slots.acquire()
            yield request(sessions[index % len(sessions)], rng, index)

    async for reply in stub.ScoreStream(requests(), metadata=metadata(tenant), timeout=300):
        slots.release()
        if reply.HasField("error"):
            errors.append(reply.error.code)
        else:
            on_answer(tenant, time.perf_counter())
    return errors


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_equal_demand_is_served_fairly_without_errors(teacher):
    async def main():
        async with grpc.aio.insecure_channel(teacher.target) as control:
            stub = teacher_pb2_grpc.TeacherStub(control)
            sessions = {tenant: await open_sessions(stub, tenant, index + 1) for index, tenant in enumerate(TENANTS)}
        answers: dict[str, list[float]] = {tenant: [] for tenant in TENANTS}
        channels = [grpc.aio.insecure_channel(teacher.target) for _ in range(16)]
        try:
            started = time.perf_counter()
            clients = [
                windowed_stream(
                    teacher_pb2_grpc.TeacherStub(channels[4 * t + c]),
                    tenant,
                    sessions[tenant],
                    200,
                    8,
                    seed=4 * t + c,
                    on_answer=lambda who, at: answers[who].append(at),
                )
                for t, tenant in enumerate(TENANTS)
                for c in range(4)
            ]
            errors = [code for result in await asyncio.gather(*clients) for code in result]
            elapsed = time.perf_counter() - started
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))
        return answers, errors, elapsed

    answers, errors, elapsed = asyncio.run(main())
    assert errors == []
    assert {tenant: len(times) for tenant, times in answers.items()} == {tenant: 800 for tenant in TENANTS}
    # Throughput while every tenant still had work: from the start to the first tenant's last answer.
    window_end = min(max(times) for times in answers.values())
    served = [sum(at <= window_end for at in times) for times in answers.values()]
    index = jain([float(count) for count in served])
    print(
        f"\nload, equal demand: 16 clients x 200 requests, 0 errors, {3200 / elapsed:.0f} requests/s, "
        f"answers per tenant in the common window {served}, Jain index {index:.4f}"
    )
    assert index >= 0.95


async def alternate_with_flood(light, flood_args: list[str]) -> tuple[list[float], list[float], str]:
    """The light tenant's latencies alone and under the flood, sampled alternately.

    The flood runs in its own process (tests/teacher_server/flood.py), bounded to 120 s.
    Loaded and unloaded samples alternate (the flood paused with SIGSTOP), so a change
    in the machine's other load affects both alike."""
    await light(20)  # warm-up
    flood = subprocess.Popen(
        [sys.executable, "-m", "tests.teacher_server.flood", *flood_args, "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    alone, flooded = [], []
    try:
        await asyncio.sleep(3.0)  # the flood is in full swing: 128 requests in flight
        for _ in range(4):
            flooded += await light(10)
            flood.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)  # the teacher works off the flood's queued requests
            alone += await light(10)
            flood.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.5)  # its queue is deep again
    finally:
        flood.send_signal(signal.SIGCONT)
        output, _ = flood.communicate("", timeout=90)  # closing its stdin stops it
    return alone, flooded, output


def check_light_tenant(alone: list[float], flooded: list[float], output: str, front: str) -> None:
    unloaded, loaded = statistics.median(alone), statistics.median(flooded)
    print(
        f"\nload, flooding over {front}: light tenant median latency {1000 * unloaded:.1f} ms alone, "
        f"{1000 * loaded:.1f} ms while another tenant kept 128 requests in flight (flood: {output.strip()}): "
        f"ratio {loaded / unloaded:.2f}"
    )
    answered, errors = (int(part.split("=")[1]) for part in output.split())
    assert answered > 100 and errors == 0
    assert loaded <= 3 * unloaded


def test_a_flooding_tenant_does_not_slow_a_light_one_beyond_3x(teacher):
    async def main():
        async with grpc.aio.insecure_channel(teacher.target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            (light_session,) = await open_sessions(stub, LIGHT, 1)
            (heavy_session,) = await open_sessions(stub, "t0", 1)
            rng = np.random.default_rng(0)

            async def light(count: int) -> list[float]:
                latencies = []
                for _ in range(count):
                    started = time.perf_counter()
                    await stub.Score(request(light_session, rng), metadata=metadata(LIGHT), timeout=60)
                    latencies.append(time.perf_counter() - started)
                    await asyncio.sleep(0.005)
                return latencies

            return await alternate_with_flood(light, [teacher.target, KEYS["t0"], heavy_session])

    check_light_tenant(*asyncio.run(main()), "gRPC")


def test_a_flooding_tenant_does_not_slow_a_light_one_beyond_3x_over_http(teacher):
    """The same fairness through the HTTP front end: both tenants speak vLLM's dialect."""
    base = teacher.http_base
    rng = np.random.default_rng(0)
    session = requests.Session()

    def light_once() -> float:
        body = {"prompt": [rng.integers(4, 96, size=SEQUENCE).tolist()], "max_tokens": 1, "prompt_logprobs": TOP_K}
        started = time.perf_counter()
        answer = session.post(base + "/v1/completions", json=body, headers=metadata_header(LIGHT), timeout=60)
        assert answer.ok, answer.text
        return time.perf_counter() - started

    async def light(count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            latencies.append(await asyncio.to_thread(light_once))
            await asyncio.sleep(0.005)
        return latencies

    with session:
        check_light_tenant(*asyncio.run(alternate_with_flood(light, [base, KEYS["t0"], "http"])), "HTTP")
