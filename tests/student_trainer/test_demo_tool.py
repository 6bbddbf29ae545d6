"""Tests for the demo's tool task (demo/lookup.py, demo/tool.py): the keys, the template, the
environment, and the supervised targets that leave the tool's answers out of the loss."""

from __future__ import annotations

from student_trainer.data import Prompt
from student_trainer.demo import lookup, tool
from student_trainer.environments import EpisodeEnd, Observation


def test_keys_split_every_key_once_and_values_are_fixed_digits():
    train, heldout = lookup.keys("train"), lookup.keys("heldout")
    assert sorted(train + heldout) == [f"{n:03d}" for n in range(1000)] and 150 < len(heldout) < 260
    values = [lookup.value_of(key) for key in train]
    assert all(len(v) == 3 and v.isdigit() for v in values) and len(set(values)) > 500
    assert values == [lookup.value_of(key) for key in train]


def test_the_template_renders_a_solved_episode_one_character_a_token():
    tokenizer = lookup.build_tokenizer()
    value = lookup.value_of("123")
    text = tokenizer.apply_chat_template(lookup.solved("123"), tokenize=False)
    assert text == f"<bos>123>?123<eos><tool>{value}>{value}<eos>"
    seqs, targets = tool.encode_episodes(tokenizer, [lookup.solved("123"), lookup.solved("7")])
    row = tokenizer.convert_ids_to_tokens(seqs[0].tolist())
    assert row == ["<bos>", "1", "2", "3", ">", "?", "1", "2", "3", "<eos>", "<tool>", *value, ">", *value, "<eos>"]
    trained = [token for token, target in zip(row, targets[0].tolist()) if target != -100]
    assert trained == ["?", "1", "2", "3", "<eos>", *value, "<eos>"]  # the assistant's turns only
    assert targets[1, -1] == -100 and seqs[1, -1] == tokenizer.pad_token_id  # the shorter row is padded


def test_the_tool_answers_a_well_formed_call_once_and_rewards_the_right_value():
    prompt = Prompt([1], (("user", "123"),))
    episode = lookup.LookupTool().start(prompt)
    assert episode.respond("?456") == Observation(lookup.value_of("456"), role="tool")  # any key may be looked up
    assert episode.respond(lookup.value_of("123")) == EpisodeEnd(reward=1.0)
    for first_turn in ("?12", "?12a", "123", ""):  # not a call: the episode ends with that answer
        assert lookup.LookupTool().start(prompt).respond(first_turn) == EpisodeEnd(reward=0.0)
    again = lookup.LookupTool().start(prompt)
    again.respond("?123")
    assert again.respond("?123") == EpisodeEnd(reward=0.0)  # one call per episode
    assert lookup.LookupTool().start(prompt).respond(lookup.value_of("123")) == EpisodeEnd(reward=1.0)
