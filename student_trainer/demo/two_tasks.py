"""Two tasks, two teachers, one student (opd-demo --task two-teachers).

Reverse ("123456>" -> "654321") is the demo's task; complement ("123456>>" -> "876543", each
digit d written as 9 - d, in order) is a second one in the same vocabulary, told apart by its
second separator. The reverse teacher is the demo's (task.TEACHER_RECIPE); the complement teacher
is the same model trained on complements only, so each teacher is an expert in one task and
knows nothing of the other. The student is the demo's small model trained briefly on both
tasks, weak at each.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from student_trainer.demo import task

COMPLEMENT_SEPARATOR = task.SEPARATOR * 2
TASKS = ("reverse", "complement")


def complement(problem: task.Problem) -> task.Problem:
    digits = problem.prompt[: task.NUM_DIGITS]
    return task.Problem(digits + COMPLEMENT_SEPARATOR, "".join(str(9 - int(d)) for d in digits))


def problems(name: str, n: int, seed: int, split: str = "train") -> list[task.Problem]:
    """`n` problems of task `name` (TASKS); the held-out digit strings are the demo's."""
    drawn = task.make_problems(n, seed, split=split)
    return drawn if name == "reverse" else [complement(p) for p in drawn]


def heldout(name: str, n: int = 500) -> list[task.Problem]:
    return problems(name, n, task.HELDOUT_SEED, split="heldout")


# The complement teacher: the reverse teacher's model and schedule, on complements only.
COMPLEMENT_TEACHER_RECIPE = replace(task.TEACHER_RECIPE, name="teacher-complement")
# The student: the demo student's model on a mix of REVERSE_SHARE reversals and complements. Each
# task is learnt in a jump, at a step that moves with the schedule's length (held-out reverse /
# complement accuracy, one thread, each a separate run: 50% reversals, 230 steps: 1% / 40%;
# 60%, 270: 9% / 10%; 275: 36% / 19%; 280: 23% / 11%; 290: 18% / 4%; 75%, 170: 97% / 22%);
# 280 steps at 60% is weak at both. The bounds hold each task's accuracy, not only their mean.
REVERSE_SHARE = 0.6
STUDENT_RECIPE = replace(task.STUDENT_RECIPE, name="student-two-tasks", steps=280)
STUDENT_BOUNDS = (0.03, 0.5)


def build_complement_teacher(recipe: task.Recipe, tokenizer):
    model = task.recipe_model(recipe, tokenizer)
    train = problems("complement", recipe.train_problems, recipe.seed)
    task.train_supervised(
        model, tokenizer, train, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed
    )
    return model, task.accuracy(model, tokenizer, heldout("complement", task.EVAL_PROBLEMS))


def build_student(recipe: task.Recipe, tokenizer):
    """Trained on both tasks at once; refused unless weak at each (STUDENT_BOUNDS). Its accuracy
    for the recipe's own bounds is the mean of the two."""
    model = task.recipe_model(recipe, tokenizer)
    reversals = int(recipe.train_problems * REVERSE_SHARE)
    mixed = problems("reverse", reversals, recipe.seed)
    mixed += problems("complement", recipe.train_problems - reversals, recipe.seed + 1)
    random.Random(recipe.seed).shuffle(mixed)
    task.train_supervised(
        model, tokenizer, mixed, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed
    )
    scores = {name: task.accuracy(model, tokenizer, heldout(name, task.EVAL_PROBLEMS)) for name in TASKS}
    low, high = STUDENT_BOUNDS
    if not all(low <= score <= high for score in scores.values()):
        raise RuntimeError(f"{recipe.name}: held-out accuracy {scores} is not within {STUDENT_BOUNDS} for each task")
    return model, sum(scores.values()) / len(scores)


def prepare_teachers(cache_dir: Path) -> dict[str, Path]:
    return {
        "reverse": task.prepare_teacher(cache_dir),
        "complement": task.prepare(cache_dir, COMPLEMENT_TEACHER_RECIPE, build_complement_teacher),
    }


def prepare_student(cache_dir: Path) -> Path:
    return task.prepare(cache_dir, STUDENT_RECIPE, build_student)
