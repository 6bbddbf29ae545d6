"""Tests for student_trainer.environments: multi-turn episodes whose observations are rendered with
the student's chat template, masked from the teacher's scoring (CONTEXT) and from the loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opd.mask_reasons import MASK_REASONS
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.client import TeacherClient
from student_trainer.config import load_config
from student_trainer.data import Prompt
from student_trainer.environments import EpisodeEnd, EpisodeOptions, Observation, observation_ids, sample_episodes
from student_trainer.rollouts import HfRollouts
from student_trainer.step import teacher_requests
from student_trainer.train import train

QUESTION = [{"role": "user", "content": "w5 w6 w7"}]


class CountingTool:
    """Answers the first turn with the number of words it had (as a word 'wN'); the second turn
    ends the episode, rewarded 1 when it repeats that word."""

    def start(self, prompt: Prompt) -> "CountingEpisode":
        return CountingEpisode()


class CountingEpisode:
    def __init__(self) -> None:
        self.told: str | None = None
        self.turns: list[str] = []

    def respond(self, turn: str) -> Observation | EpisodeEnd:
        self.turns.append(turn)
        if self.told is None:
            self.told = f"w{len(turn.split()) % 90}"
            return Observation(self.told)
        return EpisodeEnd(reward=float(self.told in turn.split()))


@pytest.mark.parametrize("ended", [True, False], ids=["turn-closed-by-eos", "turn-cut-by-the-limit"])
def test_observation_continues_the_students_own_template(smollm2, ended):
    """With a real chat template (SmolLM2's ChatML): prompt + the student's turn + the observation
    tokens decode to exactly the template's rendering of the conversation, next turn opened."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    question = [{"role": "user", "content": "What is 7 times 6?"}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    turn = tokenizer('<tool_call>{"name": "multiply", "args": [7, 6]}', add_special_tokens=False)["input_ids"]
    turn += [tokenizer.eos_token_id] if ended else []
    messages = [*question, {"role": "assistant", "content": tokenizer.decode(turn, skip_special_tokens=True)}]
    messages.append({"role": "tool", "content": "42"})
    context = observation_ids(tokenizer, messages, ids + turn)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids + turn + context, skip_special_tokens=False) == rendered
    closing = tokenizer.decode(context, skip_special_tokens=False)
    assert closing.startswith("\n" if ended else "<|im_end|>\n") and "<|im_start|>tool\n42<|im_end|>" in closing
    assert closing.endswith("<|im_start|>assistant\n")


def test_a_template_that_rewrites_the_students_text_is_refused(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }} <eos> {% endfor %}"
    with pytest.raises(ValueError, match="does not render the conversation as a continuation of its tokens"):
        observation_ids(tokenizer, [*QUESTION, {"role": "tool", "content": "w1"}], tokenizer("w5 w6 w7")["input_ids"])


def episodes(student, episode: EpisodeOptions, seeds=(11, 12, 13, 14)):
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    engine = HfRollouts(model, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prompts = [Prompt(ids, (("user", "w5 w6 w7"),))] * len(seeds)
    options = dict(top_p=0.9, temperature=1.0)
    rollouts = sample_episodes(
        engine, prompts, list(seeds), CountingTool(), tokenizer, episode, candidates=3, **options
    )
    single = engine.generate([ids] * len(seeds), list(seeds), max_new_tokens=episode.max_new_tokens, **options)
    return tokenizer, rollouts, single


def test_episodes_interleave_the_students_turns_with_masked_observations(student):
    tokenizer, rollouts, single = episodes(
        student, EpisodeOptions(max_turns=3, max_new_tokens=6, max_rollout_tokens=40)
    )
    for rollout, first_turn in zip(rollouts, single):
        completion = rollout.tokens[rollout.prompt_length :]
        mask = rollout.score_mask
        assert len(mask) == len(completion) == len(rollout.logprobs) == len(rollout.candidate_ids)
        # Turn 0 is what a single-turn rollout with the same seed samples.
        turn = first_turn.tokens[first_turn.prompt_length :]
        assert completion[: len(turn)] == turn and mask[: len(turn)].all()
        assert rollout.logprobs[: len(turn)] == first_turn.logprobs
        # Then the observation (context), then the second turn, which ends the episode.
        assert rollout.turns == 2 and rollout.reward in (0.0, 1.0)
        context = np.flatnonzero(mask == 0)
        assert len(context) > 0 and context[0] == len(turn) and np.all(np.diff(context) == 1)
        told = f"w{len(tokenizer.decode(turn, skip_special_tokens=True).split()) % 90}"
        closed = turn[-1] == tokenizer.eos_token_id  # a turn cut by the limit is closed by the template
        expected = ([] if closed else ["<eos>"]) + [told, "<eos>"]
        assert tokenizer.decode([completion[i] for i in context], skip_special_tokens=False).split() == expected
        assert all(math.isnan(rollout.logprobs[i]) for i in context)
        assert not rollout.candidate_ids[context].any() and mask[context[-1] + 1 :].all()


def test_turn_and_token_limits_end_episodes(student):
    _, one_turn, single = episodes(student, EpisodeOptions(max_turns=1, max_new_tokens=6, max_rollout_tokens=40))
    for rollout, expected in zip(one_turn, single):  # the observation is never appended: no turn would read it
        assert rollout.tokens == expected.tokens and rollout.turns == 1 and rollout.score_mask.all()
    _, tight, _ = episodes(student, EpisodeOptions(max_turns=3, max_new_tokens=6, max_rollout_tokens=8))
    for rollout in tight:
        assert rollout.completion_length <= 8
        # A turn and its observation leave no room for a second turn: the episode ends after the first.
        assert rollout.turns == 1 and rollout.score_mask.all()


def test_observations_left_in_the_loss_change_the_mask_only(student):
    options = dict(max_turns=3, max_new_tokens=6, max_rollout_tokens=40)
    _, masked, _ = episodes(student, EpisodeOptions(**options))
    _, unmasked, _ = episodes(student, EpisodeOptions(**options, mask_observations=False))
    for a, b in zip(masked, unmasked):
        assert a.tokens == b.tokens and not a.score_mask.all() and b.score_mask.all()


def test_teacher_masks_observations_as_context_and_training_logs_episodes(live_server, student, tmp_path):
    tokenizer, rollouts, _ = episodes(student, EpisodeOptions(max_turns=3, max_new_tokens=6, max_rollout_tokens=40))
    prompts = [Prompt(rollouts[0].tokens[: rollouts[0].prompt_length], (("user", "w5 w6 w7"),))] * len(rollouts)
    with TeacherClient(live_server.target) as teacher:
        teacher.open_session()
        scores = teacher.score_many(teacher_requests(rollouts, prompts, chat=True), top_k=4)
    for rollout, score in zip(rollouts, scores):
        context = rollout.score_mask == 0
        np.testing.assert_array_equal(score.reason == MASK_REASONS["context"], context)
        assert not score.mask[context].any() and (score.ids[context] == -1).all()

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": QUESTION}) + "\n" for _ in range(8)))
    settings = dict(student=str(student), teacher=live_server.target, prompts=str(path), steps=2, top_k=4)
    settings |= dict(batch_size=4, micro_batch_size=4, max_new_tokens=6, max_turns=3, eval_prompts=str(path))
    records = train(
        load_config(None, **settings, eval_size=4, output=str(tmp_path / "run")), environment=CountingTool()
    )
    assert all(1.0 < r["turns_mean"] <= 2.0 and 0.0 <= r["reward_mean"] <= 1.0 for r in records[1:])
    assert all(r["masked_context"] > 0.0 for r in records[1:])
    assert records[0]["eval_turns_mean"] > 1.0 and "eval_reward_mean" in records[-1]
    with pytest.raises(ValueError, match="needs chat prompts"):
        text = tmp_path / "text.jsonl"
        text.write_text(json.dumps({"prompt": "w5 w6"}) + "\n")
        train(
            load_config(None, **(settings | {"prompts": str(text), "eval_prompts": ""}), output=str(tmp_path / "t")),
            environment=CountingTool(),
        )
