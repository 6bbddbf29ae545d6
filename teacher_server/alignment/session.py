"""One student tokenizer against the teacher's: the tables a session shares, and the steps of a request.

A request is `align`, then `steps`: a generator that yields the teacher passes it
needs (one over the teacher sequence, then bounded rounds of branch passes) and is
sent their scores back, and returns the result. The service (which awaits the
scheduler between passes and runs each stretch of array work in a worker thread) and
the tests/benchmarks (`score`, which call an engine directly) drive the same steps:

    plan = cross.align(tokens, score_from, messages)
    steps = cross.steps(plan, top_k, temperature, rounds)
    job = next(steps)
    while True: job = steps.send(engine.score([job])[0])   # until StopIteration(result)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Sequence

import numpy as np

from opd.mask_reasons import MASK_REASONS
from opd.v1 import teacher_pb2
from teacher_server.alignment.align import Alignment, align
from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.pair import PairTables, pair_tables
from teacher_server.alignment.project import Projection
from teacher_server.alignment.specials import SpecialMap, excluded_support
from teacher_server.alignment.text import TeacherText
from teacher_server.engines.base import Branch, ScoringJob, TeacherScores


@dataclass(frozen=True)
class CrossOptions:
    # Teacher candidates read at every teacher row (several teacher tokens can land on
    # one student token, and some are inconsistent with the partial bytes r).
    candidates: int = 64
    # ... and at rows where a student position falls inside the teacher token: only candidates
    # beginning with its partial bytes count there (the engine's pass then returns this many per row).
    inside_candidates: int = 128
    # Extra rounds of branches for off-rollout paths (0 = none): a path still open after them lands
    # on its longest student token so far (project.py), so a student that writes a number of up to
    # three digits as one token ("130" against "1", "3", "0") needs three.
    rounds: int = 3
    # Branches are scored for open paths at least this probable ...
    min_branch_prob: float = 0.01
    # ... and at most this many branch tokens per request: max(floor, factor * positions).
    branch_token_floor: int = 64
    branch_token_factor: float = 2.0
    # Inside a teacher token, LOW_MASS when the consistent paths read carry less than what the
    # unread candidates could (project.py), or less than this absolute floor.
    min_consistent_mass: float = 0.0


@dataclass
class Coverage:
    """Counts of one response (or, summed, of a session)."""

    positions: int = 0
    with_distribution: int = 0
    special: int = 0
    unaligned: int = 0
    low_mass: int = 0
    beyond_context: int = 0
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
class CrossResult:
    ids: np.ndarray
    logprobs: np.ndarray
    token_logprobs: np.ndarray
    mask: np.ndarray
    reason: np.ndarray
    coverage: Coverage = field(default_factory=Coverage)


# The log-probability of a student token the teacher never writes (a dropped control token):
# the log of the smallest normal float32, finite so that losses and metrics stay finite.
NEVER_WRITTEN_LOGPROB = float(np.log(np.finfo(np.float32).tiny))


def fill_dropped_specials(ids, logprobs, token_logprobs, reason, mass) -> None:
    """Without special-token masking: a dropped student special (reason SPECIAL here) takes the
    row of the next position that is not a dropped special, since the same teacher text precedes
    both; its own token gets NEVER_WRITTEN_LOGPROB. Where that position is masked, the special
    takes its reason too (BEYOND_CONTEXT, ...); with no position after it, UNALIGNED."""
    dropped = np.flatnonzero(reason == teacher_pb2.MASK_REASON_SPECIAL)
    if not len(dropped):
        return
    count = len(reason)
    index = np.where(reason == teacher_pb2.MASK_REASON_SPECIAL, count, np.arange(count))
    following = np.minimum.accumulate(index[::-1])[::-1][dropped]  # next non-dropped position, count if none
    has_next = following < count
    reason[dropped[~has_next]] = teacher_pb2.MASK_REASON_UNALIGNED
    to, source = dropped[has_next], following[has_next]
    reason[to] = reason[source]
    usable = reason[to] == teacher_pb2.MASK_REASON_OK
    to, source = to[usable], source[usable]
    ids[to], logprobs[to], mass[to] = ids[source], logprobs[source], mass[source]
    token_logprobs[to] = NEVER_WRITTEN_LOGPROB


@dataclass(eq=False)
class CrossTokenizer:
    student: ByteTable
    text: TeacherText
    specials: SpecialMap
    tables: PairTables
    excluded: np.ndarray  # teacher ids never offered as support
    max_sequence_length: int
    options: CrossOptions = CrossOptions()

    @classmethod
    def build(
        cls, student: ByteTable, text: TeacherText, specials: SpecialMap, model_vocab_size: int,
        max_sequence_length: int, options: CrossOptions = CrossOptions(),
    ) -> "CrossTokenizer":  # fmt: skip
        return cls(
            student=student,
            text=text,
            specials=specials,
            tables=pair_tables(student, text),
            excluded=excluded_support(text.table, specials, model_vocab_size),
            max_sequence_length=max_sequence_length,
            options=options,
        )

    # ------------------------------------------------------------------ steps

    def align(self, tokens: np.ndarray, score_from: int, messages: Sequence[tuple[str, str]] = ()) -> Alignment:
        plan = align(tokens, score_from, self.student, self.text, self.specials, messages)
        if len(plan.teacher_ids) > self.max_sequence_length:
            # Positions that need teacher rows past the context window: BEYOND_CONTEXT.
            limit = self.max_sequence_length - plan.teacher_from
            if limit < 1:
                raise ValueError(
                    f"the teacher's rendering of the prompt alone has {plan.teacher_from} tokens, more than its "
                    f"context of {self.max_sequence_length}"
                )
            plan.teacher_ids = plan.teacher_ids[: self.max_sequence_length]
            beyond = (plan.row < 0) | (plan.row >= limit) | (plan.e > plan.t_end[limit - 1])
            plan.reason[beyond & (plan.reason == 0)] = teacher_pb2.MASK_REASON_BEYOND_CONTEXT
            plan.t_start, plan.t_end = plan.t_start[:limit], plan.t_end[:limit]
        return plan

    def main_job(self, plan: Alignment, temperature: float = 1.0) -> ScoringJob:
        options = self.options
        # Wider rows are read only where a position falls inside a teacher token (project.py).
        inside = bool((plan.rho > 0).any())
        return ScoringJob(
            token_ids=plan.teacher_ids,
            score_from=plan.teacher_from,
            top_k=max(options.candidates, options.inside_candidates) if inside else options.candidates,
            temperature=temperature,
            exclude_ids=self.excluded,
        )

    def start(self, plan: Alignment, scores: TeacherScores) -> Projection:
        rows = len(plan.t_start)
        return Projection.start(
            plan, self.tables, self.specials, scores.ids[:rows], scores.logprobs[:rows], scores.token_logprobs[:rows],
            candidates=self.options.candidates,
        )

    def branch_requests(self, projection: Projection) -> list[tuple[int, tuple[int, ...]]]:
        options = self.options
        budget = max(options.branch_token_floor, int(options.branch_token_factor * projection.alignment.num_positions))
        requests = projection.branch_requests(options.min_branch_prob, budget)
        limit = self.max_sequence_length
        return [(at, extra) for at, extra in requests if at + len(extra) <= limit]

    def branch_job(self, plan: Alignment, requests: list[tuple[int, tuple[int, ...]]], temperature: float = 1.0) -> ScoringJob:
        # Only the prefix the branches need, and a single scored row: the pass is for the branches.
        end = min(max(max(at for at, _ in requests), 2), len(plan.teacher_ids))
        return ScoringJob(
            token_ids=plan.teacher_ids[:end],
            score_from=end - 1,
            top_k=self.options.candidates,
            temperature=temperature,
            exclude_ids=self.excluded,
            branches=tuple(Branch(attach=at, token_ids=np.asarray(extra, dtype=np.int32)) for at, extra in requests),
        )

    @staticmethod
    def absorb(projection: Projection, requests: list[tuple[int, tuple[int, ...]]], scores: TeacherScores) -> None:
        # The row after each branch's last token.
        last = np.cumsum([len(extra) for _, extra in requests]) - 1
        projection.absorb(requests, scores.branch_ids[last], scores.branch_logprobs[last])

    def finish(self, projection: Projection, top_k: int) -> CrossResult:
        ids, logprobs, token_logprobs, reason, mass = projection.finish(top_k, self.options.min_consistent_mass)
        if not self.specials.mask:
            fill_dropped_specials(ids, logprobs, token_logprobs, reason, mass)
        mask = (reason == 0).astype(np.uint8)
        used = mask.astype(bool)
        stats = projection.stats
        coverage = Coverage(
            positions=len(reason),
            with_distribution=int(used.sum()),
            retained_mass_sum=float(mass[used].sum()),
            branch_sequences=stats.branch_sequences,
            branch_tokens=stats.branch_tokens,
            unresolved_paths=stats.unresolved_paths,
            **{name: int((reason == code).sum()) for name, code in MASK_REASONS.items()},
        )
        return CrossResult(ids, logprobs, token_logprobs, mask, reason, coverage)

    def steps(
        self, plan: Alignment, top_k: int, temperature: float, rounds: int
    ) -> Generator[ScoringJob, TeacherScores, CrossResult]:
        """Yields each teacher pass of the request, is sent its scores; returns the result."""
        projection = self.start(plan, (yield self.main_job(plan, temperature)))
        for _ in range(max(rounds, 0)):
            requests = self.branch_requests(projection)
            if not requests:
                break
            self.absorb(projection, requests, (yield self.branch_job(plan, requests, temperature)))
        return self.finish(projection, top_k)

    def rounds_for(self, engine) -> int:
        """Branch rounds this session runs on `engine` (none where it cannot score branches)."""
        return self.options.rounds if getattr(engine, "supports_branches", True) else 0

    # ------------------------------------------------------------------ synchronous driver

    def score(self, engine, tokens, score_from: int, top_k: int, messages=(), temperature: float = 1.0) -> CrossResult:
        """The whole request against an engine called directly (tests, benchmarks)."""
        plan = self.align(np.asarray(tokens), score_from, messages)
        steps = self.steps(plan, top_k, temperature, self.rounds_for(engine))
        job = next(steps)
        while True:
            try:
                job = steps.send(engine.score([job])[0])
            except StopIteration as done:
                return done.value
