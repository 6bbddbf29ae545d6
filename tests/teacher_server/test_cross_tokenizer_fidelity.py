"""Fidelity of cross-tokenizer scores at every position of real GSM8K answers (tests/fidelity.py).

The real SmolLM2-135M teacher with each other real tokenizer as the student, and bigram
stand-in teachers for the other orders: the returned token log-probabilities must equal the
teacher's chain rule at every position whose student token starts and ends on teacher
boundaries, and the returned supports must match brute-force teacher probabilities at every
position of the first answers. `python bench/alignment.py fidelity` runs the same on hundreds
of answers per pair; these bounds are the acceptance figures of that run.
"""

from __future__ import annotations

import pytest

from tests import fidelity as F
from tests import tokenizers as T

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_CHAIN_MEAN = 0.005  # nats, mean |token_logprob - chain rule| at boundary positions
MAX_CHAIN_SHARE = 0.002  # share of boundary positions off by more than 0.05 nats
MAX_TV_MEAN = 0.02
MAX_TV_P99 = 0.15


def gsm8k_answers(count: int) -> list[dict]:
    try:
        return T.gsm8k()[1::2][:count]
    except FileNotFoundError:
        pytest.skip("shared/data/gsm8k/test.jsonl not found")


def check(found: F.Fidelity, label: str) -> dict:
    summary = found.summary()
    print(f"\n{label}: {summary}")
    assert summary["boundary_positions"] >= 300 and summary["boundary_masked"] == 0
    assert summary["chain_mean"] <= MAX_CHAIN_MEAN
    assert summary["chain_share_over_0.05"] <= MAX_CHAIN_SHARE
    assert summary["tv_positions"] >= 150
    assert summary["tv_mean"] <= MAX_TV_MEAN and summary["tv_p99"] <= MAX_TV_P99
    return summary


@pytest.mark.parametrize("student", ["mistral-sp-v1", "tekken", "gpt2"])
def test_real_teacher_matches_chain_rule_and_brute_force(student, smollm2):
    """SmolLM2-135M with its chat template; also the coverage (acceptance: >= 97%)."""
    reason = T.missing_reason(student)
    if reason:
        pytest.skip(f"tokenizer {student} unavailable: {reason}")
    engine = T.smollm2_engine()
    cross = T.cross(student, "smollm2", engine)
    found = F.measure(cross, engine, F.ModelRows, T.load(student), gsm8k_answers(12), tv_positions=150)
    check(found, f"{student} -> smollm2")
    assert found.coverage.coverage >= 0.97 and found.coverage.mean_retained_mass > 0.5


@pytest.mark.parametrize("pair", ["smollm2:gpt2", "gpt2:mistral-sp-v1", "mistral-sp-v1:tekken"])
def test_stand_in_teacher_matches_chain_rule_and_brute_force(pair):
    """The other orders, with a bigram teacher of the teacher's tokenizer (no such model installs offline)."""
    student, teacher = pair.split(":")
    for name in (student, teacher):
        reason = T.missing_reason(name)
        if reason:
            pytest.skip(f"tokenizer {name} unavailable: {reason}")
    answers = gsm8k_answers(12)
    engine = T.BigramTeacher(T.load(teacher), [example["answer"] for example in T.gsm8k()[::2]])
    cross = T.cross(student, teacher, engine)
    check(F.measure(cross, engine, F.BigramRows, T.load(student), answers, tv_positions=150, chat=False), pair)
