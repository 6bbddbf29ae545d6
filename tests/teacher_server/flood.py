"""A flooding tenant in its own process: `python -m tests.teacher_server.flood TARGET KEY SESSION SECONDS`.

Keeps 4 ScoreStreams with 32 unanswered requests each busy against TARGET until
its standard input closes, for at most SECONDS and 100,000 requests, then prints
`answered=N errors=M`. With SESSION `http` TARGET is an HTTP base URL instead, and the
same 128 requests stay in flight as /v1/completions posts (16 clients x 8 prompts).
Run by test_load.py; in its own process so that handling the flood's answers does
not slow down the light tenant's client that the test measures.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import grpc
import numpy as np

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc

STREAMS, WINDOW, LIMIT = 4, 32, 100_000


async def flood(target: str, key: str, session_id: str, seconds: float) -> tuple[int, int]:
    deadline = time.monotonic() + seconds
    counts = {"answered": 0, "errors": 0, "sent": 0}
    stopped = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopped.set()), daemon=True).start()

    async def stream(seed: int) -> None:
        rng = np.random.default_rng(seed)
        slots = asyncio.Semaphore(WINDOW)

        async def requests():
            while time.monotonic() < deadline and counts["sent"] < LIMIT and not stopped.is_set():
                await slots.acquire()
                counts["sent"] += 1
                tokens = rng.integers(4, 96, size=24).astype(np.int32)
                yield teacher_pb2.ScoreRequest(session_id=session_id, tokens=to_tensor(tokens), score_from=8, top_k=8)

        async with grpc.aio.insecure_channel(target) as channel:
            replies = teacher_pb2_grpc.TeacherStub(channel).ScoreStream(
                requests(), metadata=[("authorization", f"Bearer {key}")], timeout=seconds + 60
            )
            async for reply in replies:
                slots.release()
                counts["errors" if reply.HasField("error") else "answered"] += 1

    await asyncio.gather(*(stream(seed) for seed in range(STREAMS)))
    return counts["answered"], counts["errors"]


def http_flood(base: str, key: str, seconds: float) -> tuple[int, int]:
    import requests

    deadline = time.monotonic() + seconds
    counts = {"answered": 0, "errors": 0}
    stopped = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopped.set()), daemon=True).start()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with requests.Session() as session:
            while time.monotonic() < deadline and not stopped.is_set():
                prompts = rng.integers(4, 96, size=(WINDOW // 4, 24)).tolist()
                body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 8}
                answer = session.post(base + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
                with lock:
                    counts["answered" if answer.ok else "errors"] += len(prompts)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(STREAMS * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["answered"], counts["errors"]


if __name__ == "__main__":
    target, key, session_id, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if session_id == "http":
        answered, errors = http_flood(target, key, seconds)
    else:
        answered, errors = asyncio.run(flood(target, key, session_id, seconds))
    print(f"answered={answered} errors={errors}", flush=True)
