"""Faults during `opd-train`, all with real processes on 127.0.0.1 and deterministic settings on CPU:

* in one run, the teacher is killed with SIGKILL and restarted 3 times, and the trainer is
  killed with SIGKILL and resumed from its last checkpoint: the run completes and its final
  weights are bitwise equal to an uninterrupted run's (one run with both kinds of fault is
  stricter than one run for each, and costs one interpreter start less);
* a trainer given two teachers goes on with one when the other is killed, and gets the
  same numbers from either.

The teacher runs with --max-batch-size 1 (its numbers then do not depend on which
requests share a batch); every process runs torch on one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from student_trainer import checkpoint as checkpoint_module
from student_trainer.client import RetryPolicy, TeacherClient
from student_trainer.config import load_config
from student_trainer.train import train
from tests.helpers import start_teacher
from teacher_server.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
KILL_AFTER_STEPS = (1, 3, 5)  # the teacher dies after the trainer has logged these steps


def trainer_command(student: Path, prompts: Path, teacher: str, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "student_trainer.cli",
        "--student",
        str(student),
        "--teacher",
        teacher,
        "--prompts",
        str(prompts),
        "--steps",
        str(STEPS),
        "--output",
        str(output),
        "--top-k",
        "8",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--lr",
        "3e-3",
        "--save-every",
        "2",
        "--log-level",
        "WARNING",
        *extra,
    ]


def start_trainer(command: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.exists():
        return 0
    # Only whole lines: the trainer may be half-way through appending the last one.
    lines = [line for line in path.read_text().split("\n")[:-1] if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out; trainer log:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def finish(process: subprocess.Popen, log: Path) -> None:
    try:
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    checkpoint = checkpoint_module.latest_checkpoint(output)
    assert checkpoint is not None and checkpoint.name == f"step-{STEPS:06d}"
    return load_file(checkpoint / "model" / "model.safetensors")


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_teacher_and_trainer_killed_mid_run_end_bitwise_equal(tiny_model, student, prompts, tmp_path):
    port = free_port()
    teacher_args = ("--max-batch-size", "1", "--log-level", "WARNING")
    teacher = start_teacher(tiny_model, tmp_path, *teacher_args, port=port)
    target = teacher.target
    try:
        # 1. The uninterrupted run, in this process (a subprocess gives the same bits, see
        # the runs below, but costs another interpreter start); torch on one thread like them.
        straight = tmp_path / "straight"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(
                load_config(
                    None,
                    student=str(student),
                    teacher=target,
                    prompts=str(prompts),
                    steps=STEPS,
                    output=str(straight),
                    top_k=8,
                    batch_size=4,
                    micro_batch_size=2,
                    max_new_tokens=6,
                    lr=3e-3,
                    save_every=2,
                )
            )
        finally:
            torch.set_num_threads(threads)
        reference = final_weights(straight)
        # The other runs must not pass by accident: training changed the student.
        assert not torch.equal(reference["lm_head.weight"], load_file(student / "model.safetensors")["lm_head.weight"])

        # 2. One run with every fault: the teacher is SIGKILLed (and restarted on its port) after
        # steps 1 and 3; the trainer is SIGKILLed once it has saved step 4 and logged step 5, and
        # resumed with --resume; the teacher is SIGKILLed a third time during the resumed run.
        faulty = tmp_path / "faulty"
        logs = [tmp_path / "faulty.log", tmp_path / "faulty-resumed.log"]
        teacher_killed_at: list[int] = []

        def kill_teacher_after(step: int, run: subprocess.Popen, log: Path) -> None:
            nonlocal teacher
            wait_for(lambda: steps_logged(faulty) >= step, run, log)
            teacher.process.kill()  # SIGKILL: no drain, connections reset, sessions lost
            teacher.process.wait()
            teacher_killed_at.append(steps_logged(faulty))
            teacher = start_teacher(tiny_model, tmp_path, *teacher_args, port=port)

        run = start_trainer(trainer_command(student, prompts, target, faulty), logs[0])
        kill_teacher_after(1, run, logs[0])
        kill_teacher_after(3, run, logs[0])
        wait_for(lambda: (faulty / "checkpoints" / "step-000004").is_dir() and steps_logged(faulty) >= 5, run, logs[0])
        run.kill()  # SIGKILL: mid-step, after a checkpoint
        run.wait()
        trainer_killed_at = steps_logged(faulty)
        resumed_from = checkpoint_module.latest_checkpoint(faulty).name
        run = start_trainer(trainer_command(student, prompts, target, faulty, "--resume"), logs[1])
        kill_teacher_after(6, run, logs[1])
        finish(run, logs[1])

        print(
            f"\nfaults: teacher SIGKILLed after trainer steps {teacher_killed_at} of {STEPS} and restarted each "
            f"time; trainer SIGKILLed after step {trainer_killed_at} and resumed from {resumed_from}"
        )
        assert len(teacher_killed_at) == 3 and max(teacher_killed_at) < STEPS
        assert trainer_killed_at < STEPS, "the trainer finished before it could be killed"
        assert "lost the session" in logs[0].read_text()  # the restarts were noticed and the session re-opened
        assert_bitwise_equal(final_weights(faulty), reference)
        steps = [json.loads(line)["step"] for line in (faulty / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
    finally:
        teacher.close(timeout_s=60)


def test_two_teachers_failover_gives_the_same_numbers(tiny_model):
    from teacher_server.scheduler import SchedulerLimits
    from tests.conftest import LiveServer, server_config

    first, second = (LiveServer(server_config(tiny_model, limits=SchedulerLimits(max_batch_size=1))) for _ in range(2))
    rng = np.random.default_rng(3)
    rollouts = [(rng.integers(4, 96, size=30).astype(np.int32), 6) for _ in range(12)]
    try:
        with TeacherClient(first.target, timeout_s=30) as single:
            single.open_session()
            expected = single.score_many(rollouts, top_k=8)
        client = TeacherClient(
            f"{first.target},{second.target}", timeout_s=30, retry=RetryPolicy(max_backoff_s=0.5, max_elapsed_s=60)
        )
        with client:
            client.open_session()
            jobs_before = first.server.scheduler.stats.jobs_scored
            both = client.score_many(rollouts, top_k=8)  # split over the two
            assert first.server.scheduler.stats.jobs_scored - jobs_before == 6
            assert second.server.scheduler.stats.jobs_scored == 6
            first.stop()
            after = client.score_many(rollouts, top_k=8)  # the survivor takes it all
            assert second.server.scheduler.stats.jobs_scored == 6 + 12
        for got in (both, after):
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_array_equal(a.logprobs, b.logprobs)
                np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
    finally:
        second.stop()
        if first.thread.is_alive():
            first.stop()


def test_round_robin_over_replicas_reopens_the_session_on_each(tiny_model):
    """One load-balanced endpoint over two replicas: calls alternate between them, so a session
    opened on one is unknown on the other. The client's re-opens must reach both (a naive
    re-open after each NOT_FOUND would land on the replica that already has it, forever)."""
    from tests.conftest import LiveServer, server_config

    servers = [LiveServer(server_config(tiny_model)) for _ in range(2)]
    target = "ipv4:" + ",".join(server.target for server in servers)
    rng = np.random.default_rng(4)
    rollouts = [(rng.integers(4, 96, size=20).astype(np.int32), 5) for _ in range(6)]
    try:
        with TeacherClient(target, timeout_s=30, retry=RetryPolicy(max_backoff_s=0.2, max_elapsed_s=60)) as client:
            session_id = client.open_session()
            for tokens, score_from in rollouts:  # unary calls, spread over both replicas
                assert client.score(tokens, score_from, 8).ids.shape == (15, 8)
            assert len(client.score_many(rollouts, top_k=8)) == 6
        for server in servers:
            assert server.server.teachers.named("").sessions.get(session_id).session_id == session_id
            assert server.server.scheduler.stats.jobs_scored > 0  # both replicas did work
    finally:
        for server in servers:
            server.stop()
