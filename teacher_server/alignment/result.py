"""What every alignment returns, and how its steps are driven.

An alignment (identity.py for a student with the teacher's own tokenizer, cross.py for any
other) turns one request into `steps`: a generator that yields the teacher passes it needs
(ScoringJob), is sent each pass's scores (TeacherScores) and returns a ScoreResult. The
service drives it with the scheduler between passes; tests and benchmarks with `drive`,
calling an engine directly:

    steps = alignment.steps(tokens, score_from, top_k, temperature, messages, rounds=None)
    result = drive(steps, engine)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Protocol, Sequence

import numpy as np

from opd.mask_reasons import MASK_REASONS
from opd.v1 import teacher_pb2
from teacher_server.engines.base import ScoringJob, TeacherScores

CONTEXT = teacher_pb2.MASK_REASON_CONTEXT


@dataclass
class Coverage:
    """Counts of one response (or, summed, of a session)."""

    positions: int = 0
    with_distribution: int = 0
    special: int = 0
    unaligned: int = 0
    low_mass: int = 0
    beyond_context: int = 0
    context: int = 0
    retained_mass_sum: float = 0.0  # teacher mass on the returned support, summed over rows with mask = 1
    branch_sequences: int = 0
    branch_tokens: int = 0
    unresolved_paths: int = 0

    def add(self, other: "Coverage") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def coverage(self) -> float:
        return self.with_distribution / self.positions if self.positions else 0.0

    @property
    def mean_retained_mass(self) -> float:
        return self.retained_mass_sum / self.with_distribution if self.with_distribution else 0.0


@dataclass
class ScoreResult:
    """One request's answer, in the student's vocabulary; row p is position score_from + p."""

    ids: np.ndarray  # int32 [P, K], pad -1
    logprobs: np.ndarray  # float32 [P, K], pad -inf
    token_logprobs: np.ndarray  # float32 [P]
    mask: np.ndarray  # uint8 [P]: 1 = train on this position
    reason: np.ndarray  # uint8 [P]: why not (opd.mask_reasons), 0 where mask = 1
    counts: Coverage = field(default_factory=Coverage)
    requested_logprobs: np.ndarray | None = None  # float32 [P, M] at the request's requested ids
    # Cross-tokenizer sessions: float64 [P], the log of the teacher mass each position's values are
    # conditioned on inside a teacher token (0 at a boundary; project.py). Not sent; for checks.
    conditioning: np.ndarray | None = None


def mask_context(result: ScoreResult, score_mask: np.ndarray | None) -> ScoreResult:
    """The result with the context positions (score_mask False) masked CONTEXT and emptied; its
    counts follow (a row that had a distribution takes its support's mass out)."""
    if score_mask is None or score_mask.all():
        return result
    for name in ("ids", "logprobs", "token_logprobs", "mask", "reason", "requested_logprobs"):
        if getattr(result, name) is not None:  # an engine's arrays may be read-only views
            setattr(result, name, np.array(getattr(result, name)))
    context = ~score_mask
    was_used = context & (result.mask == 1)
    counts = result.counts
    counts.retained_mass_sum -= float(np.exp(result.logprobs[was_used].astype(np.float64)).sum())
    counts.with_distribution -= int(was_used.sum())
    result.reason[context] = CONTEXT
    result.mask[context] = 0
    result.ids[context], result.logprobs[context], result.token_logprobs[context] = -1, -np.inf, 0.0
    for name, code in MASK_REASONS.items():
        setattr(counts, name, int((result.reason == code).sum()))
    if result.requested_logprobs is not None:
        result.requested_logprobs[context] = -np.inf
    return result


def result_from(
    ids: np.ndarray,
    logprobs: np.ndarray,
    token_logprobs: np.ndarray,
    reason: np.ndarray,
    mass: np.ndarray,
    **work: int,
) -> ScoreResult:
    """The result with its mask and counts; `mass` is the support's teacher mass per row, `work`
    the branch counts of a cross-tokenizer request."""
    mask = (reason == 0).astype(np.uint8)
    used = mask.astype(bool)
    counts = Coverage(
        positions=len(reason),
        with_distribution=int(used.sum()),
        retained_mass_sum=float(mass[used].sum()),
        **{name: int((reason == code).sum()) for name, code in MASK_REASONS.items()},
        **work,
    )
    return ScoreResult(ids, logprobs, token_logprobs, mask, reason, counts)


Steps = Generator[ScoringJob, TeacherScores, ScoreResult]


class TeacherAlignment(Protocol):
    """How a session reads a student's rollouts against the teacher."""

    # Whether the work between teacher passes (aligning, projecting) is worth a worker thread: the
    # service runs it there so the event loop keeps serving; light steps run inline.
    heavy_steps: bool

    def steps(
        self,
        tokens: np.ndarray,
        score_from: int,
        top_k: int,
        temperature: float,
        messages: Sequence[tuple[str, str]],
        rounds: int | None,
        requested_ids: np.ndarray | None,
        teacher_prompt_ids: np.ndarray | None,
        score_mask: np.ndarray | None,
    ) -> Steps:
        """messages / teacher_prompt_ids: the teacher's prompt in place of tokens[:score_from] (its
        chat template / its own ids); rounds: branch rounds at most (None: the session's own; 0
        where the engine scores no branches); requested_ids: [P, M] ids whose log-probabilities
        the result carries (ScoreResult.requested_logprobs); score_mask: bool [P], False at
        context positions (masked CONTEXT, no support; None: none)."""


def advance(steps: Steps, scores: TeacherScores | None) -> ScoringJob | ScoreResult:
    """The next teacher pass, or the result when none is left (None starts the steps).

    (StopIteration cannot travel through asyncio.to_thread: a future refuses it.)
    """
    try:
        return steps.send(scores)
    except StopIteration as done:
        return done.value


def drive(steps: Steps, engine) -> ScoreResult:
    """Run the steps against an engine called directly (tests, benchmarks)."""
    step = advance(steps, None)
    while isinstance(step, ScoringJob):
        step = advance(steps, engine.score([step])[0])
    return step
