"""What the vllm and sglang engines share: jobs -> prompts, top-N candidates -> the support of base.py.

Both engines return, for a prompt, the top-N of the full-vocabulary log-softmax at
each position plus the log-probability of each prompt token. A job becomes one
prompt for its own rows and one per branch (base.py): the branch prompt is
token_ids[:attach] + branch, scored from position attach, and it also needs the
distribution after its last token (`with_next`).

Excluded ids: the support must leave out `exclude_ids` while their probability
still counts in the normaliser (the engines normalise over the full vocabulary).
Keeping the first K allowed ids of the top-N gives exactly the top-K of the
allowed ids as long as K allowed ids came back, which N >= K + |exclude| always
guarantees. The first pass asks for N = K + min(|exclude|, EXCLUDE_SLACK); a job
with a row left short runs again with N = K + |exclude| (capped at the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from teacher_server.engines.base import ScoringJob, TeacherScores

EXCLUDE_SLACK = 16

# One prompt's answer: (ids [R, N] best first, log-probs [R, N], token log-probs [len - start]),
# R = len - start (+1 with_next): the distributions of positions start .. len-1 (and of the next token).
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Prompt:
    token_ids: np.ndarray  # teacher ids
    start: int  # first position whose distribution (and token log-probability) is wanted; >= 1
    with_next: bool = False  # also the distribution after the last token


def prompts_of(job: ScoringJob) -> list[Prompt]:
    prompts = [Prompt(np.asarray(job.token_ids), job.score_from)]
    for branch in job.branches:
        if len(branch.token_ids) < 1 or not 1 <= branch.attach <= len(job.token_ids):
            raise ValueError(
                f"bad branch: attach {branch.attach}, {len(branch.token_ids)} tokens, sequence of {len(job.token_ids)}"
            )
        sequence = np.concatenate([job.token_ids[: branch.attach], branch.token_ids]).astype(job.token_ids.dtype)
        prompts.append(Prompt(sequence, branch.attach, with_next=True))
    return prompts


def excluded_ids(job: ScoringJob, vocab_size: int) -> np.ndarray:
    ids = np.unique(np.asarray(job.exclude_ids, dtype=np.int64))
    return ids[(ids >= 0) & (ids < vocab_size)]


def select_support(ids: np.ndarray, logprobs: np.ndarray, top_k: int, excluded: np.ndarray, vocab_size: int):
    """The first top_k allowed candidates of each row, padded with -1 / -inf: (ids int32, log-probs float32),
    or None when some row has fewer allowed candidates than it needs to be exact."""
    allowed = ~np.isin(ids, excluded)
    needed = min(top_k, vocab_size - len(excluded))
    if (allowed.sum(axis=1) < needed).any():
        return None
    order = np.argsort(~allowed, axis=1, kind="stable")[:, :top_k]  # allowed first, rank order kept
    keep = np.take_along_axis(allowed, order, axis=1) & (np.arange(order.shape[1]) < needed)
    rows, width = ids.shape[0], order.shape[1]
    out_ids = np.full((rows, top_k), -1, dtype=np.int32)
    out_logprobs = np.full((rows, top_k), -np.inf, dtype=np.float32)
    out_ids[:, :width] = np.where(keep, np.take_along_axis(ids, order, axis=1), -1)
    out_logprobs[:, :width] = np.where(keep, np.take_along_axis(logprobs, order, axis=1), -np.inf)
    return out_ids, out_logprobs


def assemble(job: ScoringJob, answers: Sequence[Rows], excluded: np.ndarray, vocab_size: int) -> TeacherScores | None:
    """TeacherScores of a job from the answers to prompts_of(job); None when a row was left short."""
    ids, logprobs, token_logprobs = answers[0]
    main = select_support(ids, logprobs, job.top_k, excluded, vocab_size)
    if main is None:
        return None
    scores = TeacherScores(ids=main[0], logprobs=main[1], token_logprobs=np.asarray(token_logprobs, np.float32))
    if job.branches:
        # A branch's row: after token_ids[:attach] + the whole branch, its prompt's last row.
        rows = select_support(
            np.stack([a[0][-1] for a in answers[1:]]),
            np.stack([a[1][-1] for a in answers[1:]]),
            job.top_k,
            excluded,
            vocab_size,
        )
        if rows is None:
            return None
        scores.branch_ids, scores.branch_logprobs = rows
        scores.branch_token_logprobs = np.concatenate([a[2] for a in answers[1:]]).astype(np.float32)
    return scores


def score_jobs(
    jobs: Sequence[ScoringJob], vocab_size: int, run: Callable[[list[Prompt], list[int]], list[Rows]]
) -> list[TeacherScores]:
    """Score jobs with `run(prompts, counts)`, which returns the top-counts[i] rows of prompts[i]."""
    jobs = list(jobs)
    excluded = [excluded_ids(job, vocab_size) for job in jobs]
    first = [min(vocab_size, job.top_k + min(len(ex), EXCLUDE_SLACK)) for job, ex in zip(jobs, excluded)]
    full = [min(vocab_size, job.top_k + len(ex)) for job, ex in zip(jobs, excluded)]
    results: list[TeacherScores | None] = [None] * len(jobs)
    todo = list(range(len(jobs)))
    for counts in (first, full):
        prompts, owner = [], []
        for i in todo:
            for prompt in prompts_of(jobs[i]):
                prompts.append(prompt)
                owner.append(i)
        answers = run(prompts, [counts[i] for i in owner])
        for i in todo:
            results[i] = assemble(jobs[i], [a for a, o in zip(answers, owner) if o == i], excluded[i], vocab_size)
        todo = [i for i in todo if results[i] is None]
        if not todo:
            return results  # type: ignore[return-value]
    raise RuntimeError("K + |exclude| candidates left a row with fewer than K allowed ids: the engine's top-N is wrong")


def check_temperatures(engine_name: str, jobs: Sequence[ScoringJob]) -> None:
    for job in jobs:
        if job.temperature != 1.0:
            raise ValueError(
                f"the {engine_name} engine scores at temperature 1 only (got {job.temperature}): its prompt "
                "log-probabilities come from the raw logits; open the session with temperature 1 or serve "
                "with --engine hf"
            )
