"""The two-teacher demo's tasks and prompts (demo/two_tasks.py, opd-demo --task two-teachers)."""

from __future__ import annotations

import json

from student_trainer.demo import task, two_tasks
from student_trainer.demo.run import write_routed_prompts


def test_complements_are_digitwise_nines_told_apart_by_a_second_separator():
    (reverse,) = task.make_problems(1, seed=3)
    (complement,) = two_tasks.problems("complement", 1, seed=3)
    digits = reverse.prompt[: task.NUM_DIGITS]
    assert complement.prompt == digits + ">>" and reverse.prompt == digits + ">"
    assert all(int(a) + int(b) == 9 for a, b in zip(digits, complement.answer))
    heldout = two_tasks.heldout("complement", 50)
    assert all(task.is_heldout(p.prompt[: task.NUM_DIGITS]) for p in heldout)
    tokenizer = task.build_tokenizer()
    assert tokenizer.decode(tokenizer(complement.prompt)["input_ids"], skip_special_tokens=True) == complement.prompt


def test_routed_prompts_name_their_tasks_teacher_or_the_one_route(tmp_path):
    problems = {name: two_tasks.problems(name, 4, seed=1) for name in two_tasks.TASKS}
    path = tmp_path / "prompts.jsonl"
    write_routed_prompts(path, problems, None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["teacher"] for line in lines] == ["reverse", "complement"] * 4
    assert all(line["prompt"].endswith(">>") == (line["teacher"] == "complement") for line in lines)
    write_routed_prompts(path, problems, "reverse")
    assert {json.loads(line)["teacher"] for line in path.read_text().splitlines()} == {"reverse"}
