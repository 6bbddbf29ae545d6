"""The demo's synthetic task, tokenizer, tiny models, training, evaluation and cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from student_trainer.demo import task
from student_trainer.demo.task import (
    BOS,
    EOS,
    PAD,
    VOCAB,
    Recipe,
    accuracy,
    build_model,
    build_tokenizer,
    greedy_answers,
    heldout_problems,
    make_problems,
    prepare_student,
    prepare_teacher,
    student_config,
    teacher_config,
    train_supervised,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return build_tokenizer()


def _id(char: str) -> int:
    return VOCAB.index(char)


# ---------------------------------------------------------------- tokenizer


def _check_tokenizer(t) -> None:
    bos, eos, pad = _id(BOS), _id(EOS), _id(PAD)
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2) == (pad, bos, eos)
    assert (t.pad_token, t.bos_token, t.eos_token) == (PAD, BOS, EOS)
    assert len(t) == len(VOCAB) == 14
    ids = t("123456>")["input_ids"]
    assert ids == [bos, *(_id(c) for c in "123456"), _id(">")]  # <bos> added, no <eos>
    assert t.decode(ids, skip_special_tokens=True) == "123456>"
    assert t.decode(ids) == "<bos>123456>"
    assert t.decode([*ids, *(_id(c) for c in "654321"), eos, pad], skip_special_tokens=True) == "123456>654321"
    assert t.batch_decode([ids, ids[:3]], skip_special_tokens=True) == ["123456>", "12"]
    assert t("09>")["input_ids"] == [bos, _id("0"), _id("9"), _id(">")]
    assert t("1<eos>")["input_ids"] == [bos, _id("1"), eos]  # specials are single tokens
    assert set(t.all_special_ids) == {pad, bos, eos}


def test_tokenizer_encode_decode(tok) -> None:
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    _check_tokenizer(tok)


def test_tokenizer_save_load_round_trip(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _check_tokenizer(loaded)
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert {(a["id"], a["content"], a["special"]) for a in added} == {(0, PAD, True), (1, BOS, True), (2, EOS, True)}


# ---------------------------------------------------------------- problems


def test_problems_are_reversals_and_deterministic() -> None:
    problems = make_problems(200, seed=7)
    assert problems == make_problems(200, seed=7)
    assert problems != make_problems(200, seed=8)
    assert len({p.prompt for p in problems}) == 200
    for p in problems:
        digits = p.prompt[:-1]
        assert len(digits) == 6 and digits.isdigit() and p.prompt.endswith(">")
        assert p.answer == digits[::-1]


def test_train_and_heldout_are_disjoint() -> None:
    held = {p.prompt for p in heldout_problems(1000)}
    assert len(held) == 1000
    assert all(task.is_heldout(p[:-1]) for p in held)
    for seed in (0, 1, task.HELDOUT_SEED):
        train = {p.prompt for p in make_problems(3000, seed)}
        assert not train & held
    with pytest.raises(ValueError):
        make_problems(1, 0, split="test")


# ---------------------------------------------------------------- models and training


def test_configs() -> None:
    for cfg, hidden in ((teacher_config(14), 128), (student_config(14), 64)):
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (2, hidden, 32)
        assert cfg.num_attention_heads * cfg.head_dim == hidden
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size) == (0, 1, 2, 14)
        assert cfg.max_position_embeddings >= 15  # <bos> + 6 + ">" + 6 + <eos>


def test_supervised_training_lowers_loss_and_is_deterministic(tok) -> None:
    problems = make_problems(500, seed=3)
    runs = []
    for _ in range(2):
        model = build_model(student_config(len(tok)), seed=0)
        runs.append(train_supervised(model, tok, problems, steps=30, batch_size=32, lr=5e-3, seed=0))
    assert runs[0] == runs[1]
    losses = runs[0]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3


# ---------------------------------------------------------------- evaluation


class _Oracle(torch.nn.Module):
    """A 'model' that reverses the prompt by construction, wrong when the prompt starts with `bad`."""

    def __init__(self, bad: str | None = None) -> None:
        super().__init__()
        self.bad = None if bad is None else _id(bad)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        digits = input_ids[:, 1:7]  # after <bos>
        n_gen = input_ids.shape[1] - 8  # tokens after "<bos>dddddd>"
        if n_gen < 6:
            nxt = digits[:, 5 - n_gen].clone()
            if self.bad is not None and n_gen == 0:  # answer starts with the last prompt digit
                hit = digits[:, 0] == self.bad
                nxt[hit] = _id("0") + (nxt[hit] - _id("0") + 1) % 10  # the next digit: always wrong
        else:
            nxt = torch.full((input_ids.shape[0],), _id(EOS))
        logits = torch.nn.functional.one_hot(nxt, len(VOCAB)).float()
        return transformers.modeling_outputs.CausalLMOutput(
            logits=logits[:, None, :].expand(-1, input_ids.shape[1], -1)
        )


def test_accuracy_on_oracles(tok) -> None:
    problems = heldout_problems(300)
    assert accuracy(_Oracle(), tok, problems, batch_size=64) == 1.0
    wrong = sum(p.prompt[0] == "7" for p in problems)
    assert 0 < wrong < len(problems)
    assert accuracy(_Oracle(bad="7"), tok, problems, batch_size=128) == pytest.approx(1 - wrong / len(problems))


def test_accuracy_by_doubled_digit_splits_the_problems(tok) -> None:
    """The oracle that errs on prompts starting with "7": the split accuracies are those of the two kinds."""
    problems = heldout_problems(300)
    doubled = [task.has_doubled_digit(p.answer) for p in problems]
    assert task.has_doubled_digit("123345") and not task.has_doubled_digit("121212")
    assert 0.3 < sum(doubled) / len(problems) < 0.55  # 1 - 0.9**5 = 41% of 6-digit strings
    split = task.accuracy_by_doubled_digit(_Oracle(bad="7"), tok, problems)
    right = [p.prompt[0] != "7" for p in problems]
    for key, kind in (("accuracy_doubled_digit", True), ("accuracy_no_doubled_digit", False)):
        chosen = [r for r, d in zip(right, doubled) if d == kind]
        assert split[key] == pytest.approx(sum(chosen) / len(chosen)), key
    assert split["accuracy"] == pytest.approx(sum(right) / len(right))


def test_greedy_matches_generate(tok) -> None:
    model = build_model(student_config(len(tok)), seed=5)
    train_supervised(model, tok, make_problems(500, 5), steps=15, batch_size=32, lr=5e-3, seed=5)
    problems = make_problems(6, seed=11)
    batched = greedy_answers(model, tok, problems, batch_size=4)
    for p, got in zip(problems, batched):
        ids = torch.tensor([tok(p.prompt)["input_ids"]])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=7,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        want = tok.decode(new[: new.index(tok.eos_token_id)]) if tok.eos_token_id in new else None
        assert got == want
    expected = sum(a == p.answer for a, p in zip(batched, problems)) / len(problems)
    assert accuracy(model, tok, problems) == expected


# ---------------------------------------------------------------- cache

SMALL = Recipe(
    name="student", hidden=64, heads=2, intermediate=64, train_problems=200, steps=3, batch_size=16, lr=1e-3, seed=0
)


def test_prepare_caches_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task, "EVAL_PROBLEMS", 50)
    first = prepare_student(tmp_path, SMALL)
    assert first.parent == tmp_path and SMALL.key() in first.name
    meta = json.loads((first / "demo_recipe.json").read_text())
    assert meta["steps"] == 3 and 0.0 <= meta["heldout_accuracy"] <= 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(task, "build_and_train", no_training)
    assert prepare_student(tmp_path, SMALL) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    model = transformers.AutoModelForCausalLM.from_pretrained(first)
    loaded_tok = transformers.AutoTokenizer.from_pretrained(first)
    _check_tokenizer(loaded_tok)
    assert model.config.hidden_size == 64


def test_recipe_change_invalidates_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task, "EVAL_PROBLEMS", 50)
    a = prepare_student(tmp_path, SMALL)
    b = prepare_student(tmp_path, dataclasses.replace(SMALL, steps=4))
    assert a != b and a.exists() and b.exists()
    assert SMALL.key() == dataclasses.replace(SMALL).key()


def test_prepare_refuses_a_model_off_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task, "EVAL_PROBLEMS", 50)
    with pytest.raises(RuntimeError, match="held-out accuracy"):
        prepare_teacher(tmp_path, dataclasses.replace(SMALL, name="teacher", min_accuracy=0.99))
    assert list(tmp_path.iterdir()) == []
