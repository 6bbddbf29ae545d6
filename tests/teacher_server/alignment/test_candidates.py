"""The teacher's values at the student's own candidate ids in cross-tokenizer sessions (candidates.py),
at every candidate of every position of real GSM8K answers, against brute force: the teacher
tokenizer's own encoding of the partial bytes and the candidate, scored by the real SmolLM2
teacher's full-vocabulary float64 rows (testkit/candidate_check.py). `python bench/alignment.py
candidates` runs the same on more answers."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.alignment import candidates
from teacher_server.errors import InvalidArgument
from testkit import teachers
from testkit import tokenizers as T
from testkit.candidate_check import TOLERANCE, CandidateCheck, check_example

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rollout(tokenizer, example: dict) -> tuple[np.ndarray, int]:
    prompt = tokenizer(example["question"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(prompt + completion), len(prompt)


# SentencePiece: positions on, inside and across teacher tokens; `python bench/candidates.py exact`
# also runs Tekken and GPT-2 students, on more answers (README).
@pytest.mark.parametrize("student", ["mistral-sp-v1"])
def test_candidate_values_equal_brute_force(student, smollm2):
    reason = T.missing_reason(student)
    if reason:
        pytest.skip(f"tokenizer {student} unavailable: {reason}")
    try:
        examples = sorted(T.gsm8k()[1:200:2], key=lambda example: len(example["answer"]))
    except FileNotFoundError:
        pytest.skip("shared/data/gsm8k/test.jsonl not found")
    engine = teachers.smollm2_engine()
    cross = teachers.cross(student, "smollm2", engine)
    found = CandidateCheck()
    for example in examples:  # the shortest answer with positions inside a teacher token
        tokens, score_from = rollout(T.load(student), example)
        messages = [("user", example["question"])]
        if (cross.align(tokens, score_from, messages).rho > 0).sum() >= 5:
            break
    rng = np.random.default_rng(0)
    check_example(found, cross, engine, T.load("smollm2"), tokens, score_from, messages, rng, width=6)
    summary = found.summary()
    print(f"\n{student} -> smollm2: {summary}")
    assert found.impossible_disagree == 0 and found.not_text <= 0.01 * found.candidates
    assert found.own_text > 0 and found.own_text_finite == 0
    assert summary["on"]["n"] >= 100 and summary["across"]["n"] >= 20
    for kind in ("on", "inside", "across"):
        assert summary[kind]["max"] <= TOLERANCE, kind
    assert summary["inside"]["n"] >= 5


def test_candidates_the_teacher_cannot_write_and_the_branch_budget(smollm2, monkeypatch):
    engine = teachers.smollm2_engine()
    cross = teachers.cross("gpt2", "smollm2", engine)
    gpt2 = T.load("gpt2")
    tokens = np.asarray(gpt2("Q: 3 + 4?\nA: 3 + 4 = 7.", add_special_tokens=False)["input_ids"] + [gpt2.eos_token_id])
    positions = len(tokens) - 6
    eos = gpt2.eos_token_id  # paired with the teacher's <|im_end|>: writable where a teacher token starts
    requested = np.stack([tokens[6:], np.full(positions, eos), np.full(positions, -1)], axis=1)
    result = cross.score(engine, tokens, 6, 8, requested_ids=requested)
    used = result.mask == 1
    assert np.isfinite(result.requested_logprobs[used][:, :2]).all()
    assert np.isneginf(result.requested_logprobs[:, 2]).all()
    # The target at its last position is the student's EOS: the candidate's value is the target's.
    assert result.requested_logprobs[-1, 0] == pytest.approx(result.token_logprobs[-1], abs=1e-5)
    nothing = cross.score(engine, tokens, 6, 8, requested_ids=np.full((positions, 2), -1))
    assert np.isneginf(nothing.requested_logprobs).all()
    # The branch budget is checked before the teacher pass: with none, any multi-token path is refused.
    monkeypatch.setattr(candidates, "BRANCH_TOKEN_FLOOR", 0)
    monkeypatch.setattr(candidates, "BRANCH_TOKENS_PER_CANDIDATE", 0.0)
    smol = T.load("smollm2")
    two_tokens = next(i for i in range(1000, len(gpt2)) if len(smol(gpt2.decode([i]))["input_ids"]) == 2)
    across = np.full((positions, 1), two_tokens)
    with pytest.raises(InvalidArgument, match="teacher branch tokens"):
        cross.score(engine, tokens, 6, 8, requested_ids=across)
