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
import time
from pathlib import Path

import torch

from student_trainer.config import TrainConfig
from student_trainer.demo import task
from student_trainer.plots import plot_metrics
from student_trainer.train import train
from teacher_server.launch import TeacherProcess, threads

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


def write_prompts(path: Path, problems: list[task.Problem]) -> None:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="opd-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained teacher/student are cached"
    )
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
    with TeacherProcess(teacher_path, log=args.output / "teacher.log", env=threads(1)) as teacher:
        target = teacher.target
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
