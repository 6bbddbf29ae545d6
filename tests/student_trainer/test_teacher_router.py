"""A student with two teachers of one server: each prompt's rollouts go to the teacher it names,
and the step records carry the loss and support metrics per teacher."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from student_trainer.checkpoint import latest_checkpoint, load_trainer_state
from student_trainer.client import TeacherClient
from student_trainer.config import load_config
from student_trainer.teacher_router import TeacherRouter
from student_trainer.train import train
from teacher_server.teacher_specs import TeacherSpec
from tests.conftest import LiveServer, server_config
from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def two_teachers(tiny_model, tmp_path_factory):
    other = build_tiny_model(tmp_path_factory.mktemp("second-teacher"), seed=11)  # same tokenizer, other weights
    specs = (TeacherSpec(name="first", model=str(tiny_model)), TeacherSpec(name="second", model=str(other)))
    server = LiveServer(server_config(tiny_model, teachers=specs))
    yield server
    server.stop()


def test_each_rollout_is_scored_by_its_prompts_teacher_in_the_batchs_order(two_teachers):
    rng = random.Random(0)
    requests = [([1] + [rng.randrange(4, 90) for _ in range(12)], 4) for _ in range(10)]
    teachers = ["second" if rng.random() < 0.5 else "first" for _ in requests]
    with TeacherRouter(two_teachers.target, ["first", "second"]) as router:
        router.open_sessions(None)
        routed = router.score_many(requests, teachers, top_k=4)
    for name in ("first", "second"):
        with TeacherClient(two_teachers.target, teacher=name) as client:
            client.open_session()
            direct = client.score_many(requests, top_k=4)
        for got, want, teacher in zip(routed, direct, teachers):
            if teacher == name:
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    # The two teachers differ, so the comparison above tells them apart.
    assert not np.array_equal(routed[teachers.index("first")].ids, direct[teachers.index("first")].ids)


def test_a_teacher_served_by_another_deployment_is_reached_at_its_own_endpoint(two_teachers, tmp_path):
    other = two_teachers.server.config.teachers[1]  # "second", alone in a server of its own
    alone = LiveServer(server_config(Path(other.model), teachers=(other,)))
    try:
        requests = [([1] + list(range(4, 4 + n)), 2) for n in (6, 9, 12)]
        endpoints = {"second": alone.target}
        with TeacherRouter(two_teachers.target, ["first", "second"], endpoints=endpoints) as router:
            router.open_sessions(None)
            routed = router.score_many(requests, ["second", "first", "second"], top_k=4)
        assert alone.server.scheduler.stats.jobs_scored == 2  # the two "second" rollouts went there
        with TeacherClient(two_teachers.target, teacher="second") as client:
            client.open_session()
            direct = client.score_many(requests, top_k=4)
        for row in (0, 2):
            np.testing.assert_array_equal(routed[row].ids, direct[row].ids)
            np.testing.assert_allclose(routed[row].logprobs, direct[row].logprobs, atol=1e-5)
    finally:
        alone.stop()


def test_training_with_two_teachers_logs_each_teachers_loss_and_keeps_their_pins(two_teachers, student, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rng = random.Random(1)
    lines = [
        {"prompt": " ".join(f"w{rng.randrange(90)}" for _ in range(5)), "teacher": ["first", "second"][i % 2]}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = dict(student=str(student), teacher=two_teachers.target, prompts=str(path), steps=2, top_k=4)
    settings |= dict(batch_size=8, micro_batch_size=4, max_new_tokens=6, pin_teacher=True, output=str(tmp_path / "run"))
    records = train(load_config(None, **settings))
    for record in records:
        for name in ("first", "second"):
            assert record[f"teacher.{name}.loss"] >= 0 and 0 < record[f"teacher.{name}.student_support_mass"] <= 1
    state = load_trainer_state(latest_checkpoint(tmp_path / "run"))
    assert set(state.teacher_pins) == {"first", "second"} and state.teacher_pin is None
