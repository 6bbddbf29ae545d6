"""SIGTERM drains the HTTP front end as it drains gRPC: every accepted request is answered, new
ones get 503 while the teacher finishes, health says 503, the process exits 0."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import requests

from teacher_server.launch import free_port
from tests.helpers import sigterm_under_load, start_teacher

KEY = "k" * 32
PROMPTS_PER_POST = 4


def test_sigterm_drains_http_without_losing_an_accepted_request(tiny_model, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"a {KEY}\n")
    http_port = free_port()
    teacher = start_teacher(
        tiny_model,
        tmp_path,
        "--api-keys",
        str(keys),
        "--max-batch-size",
        "1",
        "--log-format",
        "json",
        "--http-port",
        str(http_port),
    )
    base, process = f"http://127.0.0.1:{http_port}", teacher.process
    outcomes: list[tuple[str, int]] = []  # (HTTP status or "connection", prompts in the request)
    health_seen: list[int] = []
    lock = threading.Lock()
    signalled = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        deadline = time.monotonic() + 60  # bounded, whatever happens
        with requests.Session() as session:
            while time.monotonic() < deadline and not (signalled.is_set() and process.poll() is not None):
                prompts = [
                    rng.integers(4, 96, size=int(rng.integers(20, 60))).tolist() for _ in range(PROMPTS_PER_POST)
                ]
                body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 8}
                try:
                    answer = session.post(
                        base + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60
                    )
                    outcome = str(answer.status_code)
                except requests.ConnectionError:  # the port closed: never accepted
                    outcome = "connection"
                with lock:
                    outcomes.append((outcome, len(prompts)))
                if outcome != "200":
                    time.sleep(0.05)  # a client backs off

    def watch_health() -> None:
        while process.poll() is None:
            try:
                health_seen.append(requests.get(base + "/health", timeout=1).status_code)
            except requests.ConnectionError:
                break
            time.sleep(0.01)

    try:
        sigterm_under_load(
            process,
            [lambda seed=seed: client(seed) for seed in range(4)],
            watch_health,
            lambda: sum(code == "200" for code, _ in outcomes),
            20,
            signalled,
        )
    finally:
        teacher.close(timeout_s=60)

    log = [json.loads(line) for line in teacher.log_path.read_text().splitlines() if line.startswith("{")]
    drained = [entry["message"] for entry in log if entry["message"].startswith("drained:")]
    assert len(drained) == 1, [entry["message"] for entry in log][-10:]
    accepted, scored, dropped = map(int, re.search(r"(\d+) accepted, (\d+) scored, (\d+) dropped", drained[0]).groups())
    statuses = {code: sum(1 for c, _ in outcomes if c == code) for code in {c for c, _ in outcomes}}
    answered = sum(prompts for code, prompts in outcomes if code == "200")
    print(
        f"\nHTTP drain: {len(outcomes)} posts of {PROMPTS_PER_POST} prompts, statuses {statuses}; the teacher "
        f"accepted {accepted} prompts, scored {scored}, dropped {dropped}; health seen {sorted(set(health_seen))}"
    )
    # Every accepted prompt was scored and its answer arrived; the rest were refused before that.
    assert dropped == 0 and scored == accepted == answered
    assert set(statuses) <= {"200", "503", "connection"}, statuses
    assert "503" in statuses, "no request arrived during the drain"
    assert health_seen[0] == 200 and 503 in health_seen
