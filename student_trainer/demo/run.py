"""`opd-demo`: on-policy distillation end to end, offline, on a CPU, in a few minutes.

1. Prepare (train once, then cache) a teacher that reverses 6-digit strings
   almost perfectly and a weak student (demo/task.py).
2. Start the teacher service (`opd-teacher serve`) on 127.0.0.1 in a subprocess.
3. Train the student against it with teacher top-K local support matching.
4. Write metrics.jsonl and curves.png, and print the held-out accuracy before
   and after as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from student_trainer.config import TrainConfig
from student_trainer.demo import task
from student_trainer.plots import plot_metrics
from student_trainer.train import train

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opd-demo"


def demo_config(student: Path, teacher: str, output: Path, steps: int) -> TrainConfig:
    recipe = task.OPD_RECIPE  # calibrated in task.py: the measurements behind each value are there
    return TrainConfig(
        student=str(student),
        teacher=teacher,
        prompts=str(output / "prompts.jsonl"),
        eval_prompts=str(output / "heldout.jsonl"),
        eval_size=64,
        output=str(output),
        steps=steps,
        loss="topk_rkl",
        top_k=recipe.top_k,
        top_p=recipe.top_p,
        temperature=recipe.temperature,
        max_new_tokens=recipe.max_new_tokens,
        batch_size=recipe.batch_size,
        micro_batch_size=recipe.batch_size,
        lr=recipe.lr,
        eval_every=10,
        save_every=50,
        seed=0,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def teacher_service(model: Path, port: int, log_path: Path, timeout_s: float = 120.0,
                    threads: int | None = None) -> Iterator[str]:  # fmt: skip
    """Run `opd-teacher serve` in a subprocess until the block ends; yields HOST:PORT.

    `threads`: the teacher's intra-op thread count (OMP_NUM_THREADS); None inherits it.
    """
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "teacher_server.cli", "serve", "--model", str(model), "--port", str(port)]
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env) as process:
        try:
            wait_until_serving(target, process, timeout_s, log_path)
            yield target
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_serving(target: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the teacher exited with code {process.returncode}; see {log_path}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the teacher at {target} was not SERVING after {timeout_s:.0f} s; see {log_path}")


def write_prompts(path: Path, problems: list[task.Problem]) -> None:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained teacher/student are cached")
    parser.add_argument("--steps", type=int, default=task.OPD_RECIPE.steps)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the other core runs the teacher
    started = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)
    print("preparing the teacher and the student (trained once, then cached) ...", flush=True)
    teacher_path = task.prepare_teacher(args.cache_dir)
    student_path = task.prepare_student(args.cache_dir)
    tokenizer = task.build_tokenizer()
    heldout = task.heldout_problems(500)
    write_prompts(args.output / "prompts.jsonl", task.make_problems(20_000, seed=7, split="train"))
    write_prompts(args.output / "heldout.jsonl", heldout)

    def task_accuracy(model: torch.nn.Module) -> dict[str, float]:
        return {"accuracy": task.accuracy(model, tokenizer, heldout)}

    # One thread for the teacher, as in the study: with the trainer on the other core, two made
    # every teacher call many times slower on a 2-core machine.
    with teacher_service(teacher_path, free_port(), args.output / "teacher.log", threads=1) as target:
        print(f"teacher serving at {target}; training the student for {args.steps} steps ...", flush=True)
        config = demo_config(student_path, target, args.output, args.steps)
        records = train(config, evaluate_task=task_accuracy)
    plot = plot_metrics(records, args.output / "curves.png", title="opd-demo: 6-digit reversal, top-K reverse KL")
    before = records[0]["accuracy"]
    after = [r for r in records if "accuracy" in r][-1]["accuracy"]
    print(f"metrics: {args.output / 'metrics.jsonl'}  plot: {plot}  ({time.monotonic() - started:.0f} s)")
    print(f"accuracy before={before:.3f} after={after:.3f}")


if __name__ == "__main__":
    main()
