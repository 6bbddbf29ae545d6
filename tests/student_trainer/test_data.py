"""Tests for student_trainer.data: prompt lines (text, chat messages, a privileged teacher prompt),
what the teacher is sent for each, and the reproducible order of PromptStream."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from student_trainer.client import TeacherClient
from student_trainer.data import Prompt, PromptStream, load_prompts
from student_trainer.rollouts import Rollout
from student_trainer.step import teacher_requests

QUESTION = [{"role": "user", "content": "w5 w6 w7"}]
HINT = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w5 w6 w7"}]


def write(tmp_path, *records) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


def test_prompt_lines_and_what_the_teacher_reads(tmp_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text, chat, hinted = load_prompts(
        write(
            tmp_path,
            {"prompt": "w1 w2"},
            {"messages": QUESTION},
            {"messages": QUESTION, "teacher_messages": HINT},
        ),
        tokenizer,
    )
    assert text == Prompt(tokenizer("w1 w2")["input_ids"])
    assert chat.ids == tokenizer("w5 w6 w7 <eos>", add_special_tokens=False)["input_ids"]  # the student's template
    assert chat.messages == (("user", "w5 w6 w7"),) and not chat.teacher_messages
    assert hinted.ids == chat.ids and hinted.teacher_messages == (("system", "w40 w41"), ("user", "w5 w6 w7"))
    # The teacher reads: the student's tokens for a text prompt, the chat messages in its own
    # template (unless teacher_chat is off), the privileged prompt whenever there is one.
    assert [p.for_teacher(True) for p in (text, chat, hinted)] == [(), chat.messages, hinted.teacher_messages]
    assert [p.for_teacher(False) for p in (text, chat, hinted)] == [(), (), hinted.teacher_messages]


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"text": "w1"}, "needs a 'prompt' or a 'messages' field"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"prompt": "w1", "teacher_messages": [{"role": "user"}]}, "needs a 'role' and a 'content'"),
        ({"prompt": "w1", "teacher_messages": "w1"}, "'teacher_messages' must be a non-empty list"),
    ],
)
def test_bad_prompt_lines_name_the_line(tmp_path, tiny_model, record, needle):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=needle) as caught:
        load_prompts(write(tmp_path, {"prompt": "w1"}, record), tokenizer)
    assert "prompts.jsonl:2" in str(caught.value)


def test_prompt_stream_order_is_reproducible_and_resumable():
    prompts = [Prompt([i]) for i in range(5)]
    whole = PromptStream(prompts, seed=3).next_batch(12)
    first = PromptStream(prompts, seed=3)
    head = first.next_batch(7)
    assert head + PromptStream(prompts, seed=3, position=first.position).next_batch(5) == whole


def test_the_teacher_scores_the_privileged_prompt_it_is_sent(live_server, tiny_model):
    """Through the trainer's client: a rollout of the student's prompt, sent with the prompt's
    teacher_messages, is scored as the same completion after the teacher's rendering of them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    student_prompt = tokenizer("w5 w6 w7")["input_ids"]
    completion = tokenizer("w9 w10 w11 w12", add_special_tokens=False)["input_ids"]
    rendered = tokenizer.apply_chat_template(HINT, add_generation_prompt=True, tokenize=True)
    rendered = list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)
    prompt = Prompt(student_prompt, teacher_messages=tuple((m["role"], m["content"]) for m in HINT))
    rollout = Rollout(student_prompt + completion, len(student_prompt))
    with TeacherClient(live_server.target, timeout_s=30) as client:
        client.open_session()
        sent, plain = client.score_many(teacher_requests([rollout] * 2, [prompt, Prompt(student_prompt)], True), 8)
        (direct,) = client.score_many([(rendered + completion, len(rendered))], 8)
    assert np.array_equal(sent.ids, direct.ids)
    np.testing.assert_allclose(sent.logprobs, direct.logprobs, atol=1e-5)
    np.testing.assert_allclose(sent.token_logprobs, direct.token_logprobs, atol=1e-5)
    assert not np.allclose(plain.token_logprobs, direct.token_logprobs, atol=1e-3)  # the hint changed them
