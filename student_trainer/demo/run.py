"""`opd-demo`: on-policy distillation end to end, offline, on a CPU, in a few minutes.

1. Prepare (train once, then cache) a teacher that reverses 6-digit strings
   almost perfectly and a weak student (demo/task.py); with --task tool, a teacher
   that answers with a lookup tool's help in two-turn episodes and a weak student
   (demo/lookup.py, demo/tool.py), trained on episodes whose tool answers are masked.
2. Start the teacher service (`opd-teacher serve`) on 127.0.0.1 in a subprocess.
3. Train the student against it with teacher top-K local support matching.
4. Write metrics.jsonl and curves.png, and print the held-out accuracy before
   and after as the last line.

--task two-teachers: two teachers in one server, each an expert in one task (reverse,
complement: demo/two_tasks.py), and a student weak at both, trained three ways: every prompt
scored by its task's teacher, and every prompt by one teacher (each in turn); the held-out
accuracy on each task before and after, per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from student_trainer.config import TrainConfig
from student_trainer.demo import lookup, task, tool, two_tasks
from student_trainer.plots import plot_metrics
from student_trainer.train import train
from teacher_server.launch import TeacherProcess, threads

TITLES = {
    "reverse": "opd-demo: 6-digit reversal, top-K reverse KL",
    "tool": "opd-demo: lookup-tool episodes",
    "hint": "opd-demo: self-distillation of the tool's answers (privileged teacher context)",
    "two-teachers": "opd-demo: two tasks, each prompt distilled from its task's teacher",
}
# The two-teacher runs: which teacher scores the prompts of each task (None: the task's own).
TEACHER_ROUTES = {"both": None, "reverse-only": "reverse", "complement-only": "complement"}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opd-demo"


def demo_config(student: Path, teacher: str, output: Path, steps: int, seed: int = 0) -> TrainConfig:
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
        seed=seed,
    )


def tool_config(
    student: Path, teacher: str, output: Path, steps: int, seed: int, mask_observations: bool
) -> TrainConfig:
    """The tool task: two-turn episodes against the lookup tool (demo/lookup.py), K = the whole
    non-special vocabulary."""
    return dataclasses.replace(
        demo_config(student, teacher, output, steps, seed),
        top_k=len(lookup.VOCAB) - 4,
        max_new_tokens=tool.EPISODE.max_new_tokens,
        max_turns=tool.EPISODE.max_turns,
        max_rollout_tokens=tool.EPISODE.max_rollout_tokens,
        mask_observations=mask_observations,
    )


def write_prompts(path: Path, problems: list[task.Problem]) -> None:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))


def write_tool_prompts(path: Path, keys: list[str], hinted: bool = False) -> None:
    """Chat prompts of `keys`; `hinted`: the teacher reads the tool's answer as privileged context."""
    lines = (
        {"messages": lookup.question(key)} | ({"teacher_messages": lookup.looked_up(key)} if hinted else {})
        for key in keys
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run_reversal(args) -> list[dict]:
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
        print(f"teacher serving at {teacher.target}; training the student for {args.steps} steps ...", flush=True)
        return train(
            demo_config(student_path, teacher.target, args.output, args.steps, args.seed), evaluate_task=task_accuracy
        )


def run_hint(args) -> list[dict]:
    """Self-distillation with privileged context: the teacher is the student's own starting weights."""
    student_path = tool.prepare_student(args.cache_dir)
    tokenizer = lookup.build_tokenizer()
    train_keys, heldout = lookup.keys("train")[: tool.HINT_KEYS], lookup.keys("heldout")
    write_tool_prompts(args.output / "prompts.jsonl", train_keys, hinted=True)
    write_tool_prompts(args.output / "heldout.jsonl", heldout, hinted=True)

    def task_accuracy(model: torch.nn.Module) -> dict[str, float]:
        return {
            "accuracy": tool.direct_accuracy(model, tokenizer, train_keys),  # no tool, no hint
            "heldout_direct_accuracy": tool.direct_accuracy(model, tokenizer, heldout),
            "heldout_tool_accuracy": tool.accuracy(model, tokenizer, heldout),
        }

    with TeacherProcess(student_path, log=args.output / "teacher.log", env=threads(1)) as teacher:
        print(f"the student's starting weights serve as its teacher at {teacher.target} ...", flush=True)
        config = dataclasses.replace(
            demo_config(student_path, teacher.target, args.output, args.steps, args.seed),
            top_k=len(lookup.VOCAB) - 4,
            max_new_tokens=lookup.KEY_DIGITS + 1,
        )
        return train(config, evaluate_task=task_accuracy)


def write_routed_prompts(path: Path, problems: dict[str, list[task.Problem]], route: str | None) -> None:
    """The tasks' prompts interleaved, each naming its teacher: its task's, or `route` for all."""
    lines = [
        {"prompt": p.prompt, "answer": p.answer, "teacher": route or name}
        for group in zip(*([(name, p) for p in items] for name, items in problems.items()))
        for name, p in group
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run_two_teachers(args) -> list[dict]:
    teachers = two_tasks.prepare_teachers(args.cache_dir)
    student_path = two_tasks.prepare_student(args.cache_dir)
    tokenizer = task.build_tokenizer()
    heldout = {name: two_tasks.heldout(name, 500) for name in two_tasks.TASKS}
    train_problems = {name: two_tasks.problems(name, 10_000, seed=7) for name in two_tasks.TASKS}

    def task_accuracy(model: torch.nn.Module) -> dict[str, float]:
        scores = {f"accuracy_{name}": task.accuracy(model, tokenizer, problems) for name, problems in heldout.items()}
        return scores | {"accuracy": sum(scores.values()) / len(scores)}

    flags = [flag for name, path in teachers.items() for flag in ("--teacher", f"{name}={path}")]
    runs = {}
    with TeacherProcess(None, extra=flags, log=args.output / "teacher.log", env=threads(1)) as teacher:
        for run, route in TEACHER_ROUTES.items():
            output = args.output / run
            output.mkdir(parents=True, exist_ok=True)
            write_routed_prompts(output / "prompts.jsonl", train_problems, route)
            write_routed_prompts(output / "heldout.jsonl", {n: p[:32] for n, p in heldout.items()}, route)
            print(f"{run}: training the student for {args.steps} steps against {teacher.target} ...", flush=True)
            config = demo_config(student_path, teacher.target, output, args.steps, args.seed)
            runs[run] = train(config, evaluate_task=task_accuracy)
    print("held-out accuracy before -> after, by task:")
    for run, records in runs.items():
        after = [r for r in records if "accuracy" in r][-1]
        print(
            f"  {run:16s}"
            + "".join(
                f"  {n} {records[0][f'accuracy_{n}']:.3f} -> {after[f'accuracy_{n}']:.3f}" for n in two_tasks.TASKS
            )
        )
    return runs["both"]


def run_tool(args) -> list[dict]:
    teacher_path = tool.prepare_teacher(args.cache_dir)
    student_path = tool.prepare_student(args.cache_dir)
    tokenizer = lookup.build_tokenizer()
    heldout = lookup.keys("heldout")
    write_tool_prompts(args.output / "prompts.jsonl", lookup.keys("train"))
    write_tool_prompts(args.output / "heldout.jsonl", heldout)

    def task_accuracy(model: torch.nn.Module) -> dict[str, float]:
        return {"accuracy": tool.accuracy(model, tokenizer, heldout)}

    with TeacherProcess(teacher_path, log=args.output / "teacher.log", env=threads(1)) as teacher:
        print(f"teacher serving at {teacher.target}; training the student for {args.steps} steps ...", flush=True)
        config = tool_config(
            student_path, teacher.target, args.output, args.steps, args.seed, not args.observations_in_loss
        )
        return train(config, evaluate_task=task_accuracy, environment=lookup.LookupTool())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="opd-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained teacher/student are cached"
    )
    parser.add_argument("--steps", type=int, default=task.OPD_RECIPE.steps)
    parser.add_argument(
        "--task",
        choices=("reverse", "tool", "hint", "two-teachers"),
        default="reverse",
        help="reverse: 6-digit reversal; tool: two-turn episodes where the answer comes from a lookup tool; "
        "hint: the tool student answers without the tool, its own starting weights as teacher reading "
        "the tool's answer as privileged context; two-teachers: reverse and complement, each prompt "
        "distilled from its task's teacher, against one teacher for both",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt order and rollout sampling")
    parser.add_argument(
        "--observations-in-loss",
        action="store_true",
        help="tool task ablation: the tool's answers are scored and trained on as if the student wrote them",
    )
    args = parser.parse_args(argv)
    if args.observations_in_loss and args.task != "tool":
        parser.error("--observations-in-loss is an ablation of --task tool (the other tasks have no observations)")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the other core runs the teacher
    started = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)
    print("preparing the teacher and the student (trained once, then cached) ...", flush=True)
    runs = {"reverse": run_reversal, "tool": run_tool, "hint": run_hint, "two-teachers": run_two_teachers}
    records = runs[args.task](args)
    title = TITLES[args.task] + (", observations in the loss" if args.observations_in_loss else "")
    plot = plot_metrics(records, args.output / "curves.png", title=title)
    before = records[0]["accuracy"]
    after = [r for r in records if "accuracy" in r][-1]["accuracy"]
    print(f"metrics: {args.output / 'metrics.jsonl'}  plot: {plot}  ({time.monotonic() - started:.0f} s)")
    print(f"accuracy before={before:.3f} after={after:.3f}")


if __name__ == "__main__":
    main()
