"""One student tokenizer against the teacher's: the tables a session shares, and the steps of a request.

`steps` (result.py) aligns the rollout (align.py), yields the teacher pass over the teacher's
tokens, then bounded rounds of branch passes for the paths the projection follows
(project.py), and returns the projected result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server.alignment.align import Alignment, align
from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.candidates import CandidatePaths, candidate_paths, check_branch_budget, path_logprobs
from teacher_server.alignment.pair import PairTables, pair_tables
from teacher_server.alignment.project import Projection
from teacher_server.alignment.result import CONTEXT, ScoreResult, Steps, drive, mask_context, result_from
from teacher_server.alignment.specials import SpecialMap, excluded_support
from teacher_server.alignment.text import TeacherText
from teacher_server.engines.base import Branch, ScoringJob, TeacherScores
from teacher_server.errors import InvalidArgument


# Upper bounds of a client's alignment options (CrossOptions.requested): candidates is the
# engine's top-N per row, rounds are sequential engine passes, the factor sizes the branch job.
MAX_CANDIDATES = 1024
MAX_EXPANSION_ROUNDS = 8
MAX_BRANCH_TOKEN_FACTOR = 8.0
# Alignment work one request may ask for (--max-alignment-work), in scored positions at the default
# options: options that multiply each position's work (relative_work) allow fewer positions.
# Measured with SmolLM2 (bench/attacks.py): about 0.3 MB per position at the defaults, up to 11 MB at
# the maxima (36x); at 4,096 one request holds about 1.2 GB at most, and the maxima allow 113.
MAX_ALIGNMENT_WORK = 4096


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
    # Branches are scored for open paths at least this probable, and down to a tenth of it at
    # positions where the less probable open paths hold more than max_open_mass (project.py) ...
    min_branch_prob: float = 0.01
    max_open_mass: float = 0.1
    # ... and at most this many branch tokens per request: max(floor, factor * positions).
    branch_token_floor: int = 64
    branch_token_factor: float = 4.0
    # Inside a teacher token, LOW_MASS when the consistent paths read carry less than what the
    # unread candidates could (project.py), or less than this absolute floor.
    min_consistent_mass: float = 0.0

    def relative_work(self) -> float:
        """Alignment work per scored position against the defaults': candidates read per row, times
        the passes (the main one and the branch rounds), times the branch budget."""
        defaults = CrossOptions()

        def work(options: CrossOptions) -> float:
            candidates = max(options.candidates, options.inside_candidates)
            return candidates * (1 + options.rounds) * max(options.branch_token_factor, 1.0)

        return work(self) / work(defaults)

    @classmethod
    def requested(
        cls,
        candidates: int = 0,
        inside_candidates: int = 0,
        rounds: int = 0,
        branch_token_factor: float = 0.0,
        min_branch_prob: float = 0.0,
    ) -> "CrossOptions":
        """A client's options (0 = the default; rounds < 0 = none), within the server's bounds:
        each multiplies the work of every request of the session."""
        problems = []
        if not 0 <= candidates <= MAX_CANDIDATES:
            problems.append(f"candidates must be in [0, {MAX_CANDIDATES}], got {candidates}")
        if not 0 <= inside_candidates <= MAX_CANDIDATES:
            problems.append(f"inside_candidates must be in [0, {MAX_CANDIDATES}], got {inside_candidates}")
        if rounds > MAX_EXPANSION_ROUNDS:
            problems.append(f"expansion_rounds must be at most {MAX_EXPANSION_ROUNDS}, got {rounds}")
        if not 0 <= branch_token_factor <= MAX_BRANCH_TOKEN_FACTOR:
            problems.append(f"branch_token_factor must be in [0, {MAX_BRANCH_TOKEN_FACTOR}], got {branch_token_factor}")
        if not 0 <= min_branch_prob <= 1:
            problems.append(f"min_branch_prob must be in [0, 1], got {min_branch_prob}")
        if problems:
            raise InvalidArgument("alignment options: " + "; ".join(problems) + " (0 = the server's default)")
        defaults = cls()
        return cls(
            candidates=candidates or defaults.candidates,
            inside_candidates=inside_candidates or defaults.inside_candidates,
            rounds=max(rounds, 0) if rounds else defaults.rounds,
            branch_token_factor=branch_token_factor or defaults.branch_token_factor,
            min_branch_prob=min_branch_prob or defaults.min_branch_prob,
        )


# The log-probability of a student token the teacher never writes (a dropped control token):
# the log of the smallest normal float32, finite so that losses and metrics stay finite.
NEVER_WRITTEN_LOGPROB = float(np.log(np.finfo(np.float32).tiny))


def fill_dropped_specials(ids, logprobs, token_logprobs, reason, mass, requested=None) -> None:
    """Without special-token masking: a dropped student special (reason SPECIAL here) takes the
    row of the next position that is not a dropped special (its candidates' values too), since the
    same teacher text precedes both; its own token gets NEVER_WRITTEN_LOGPROB. Where that position
    is masked, the special takes its reason too (BEYOND_CONTEXT, ...); with no position after it,
    UNALIGNED."""
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
    if requested is not None:
        requested[to] = requested[source]
    token_logprobs[to] = NEVER_WRITTEN_LOGPROB


@dataclass(eq=False)
class CrossTokenizer:
    student: ByteTable
    text: TeacherText
    specials: SpecialMap
    tables: PairTables
    excluded: np.ndarray  # teacher ids never offered as support
    max_sequence_length: int
    model_vocab_size: int  # rows of the teacher's lm head: teacher ids past them cannot be read
    options: CrossOptions = CrossOptions()
    heavy_steps = True  # alignment and projection: milliseconds of array work per request

    @classmethod
    def build(
        cls,
        student: ByteTable,
        text: TeacherText,
        specials: SpecialMap,
        model_vocab_size: int,
        max_sequence_length: int,
        options: CrossOptions = CrossOptions(),
        tables: PairTables | None = None,
    ) -> "CrossTokenizer":
        """`tables`: the pair's tables if already built (in the sandbox, student_tokenizer.py)."""
        return cls(
            student=student,
            text=text,
            specials=specials,
            tables=tables or pair_tables(student, text),
            excluded=excluded_support(
                np.flatnonzero(text.table.special[:model_vocab_size]),
                specials,
                np.arange(text.table.vocab_size, model_vocab_size),
            ),
            max_sequence_length=max_sequence_length,
            model_vocab_size=model_vocab_size,
            options=options,
        )

    # ------------------------------------------------------------------ steps

    def align(
        self,
        tokens: np.ndarray,
        score_from: int,
        messages: Sequence[tuple[str, str]] = (),
        teacher_prompt_ids: np.ndarray | None = None,
    ) -> Alignment:
        plan = align(tokens, score_from, self.student, self.text, self.specials, messages, teacher_prompt_ids)
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

    def main_job(self, plan: Alignment, temperature: float = 1.0, paths: CandidatePaths | None = None) -> ScoringJob:
        """The teacher's sequence; with the paths of requested candidates, their single tokens and
        branches in the same pass (candidates.py)."""
        options = self.options
        # Wider rows are read only where a position falls inside a teacher token (project.py).
        inside = bool((plan.rho > 0).any())
        requested = paths.requested_ids if paths is not None and paths.requested_ids.shape[1] else None
        return ScoringJob(
            token_ids=plan.teacher_ids,
            score_from=plan.teacher_from,
            top_k=max(options.candidates, options.inside_candidates) if inside else options.candidates,
            temperature=temperature,
            exclude_ids=self.excluded,
            branches=paths.branches if paths is not None else (),
            requested_ids=requested,
        )

    def start(self, plan: Alignment, scores: TeacherScores) -> Projection:
        rows = len(plan.t_start)
        return Projection.start(
            plan,
            self.tables,
            self.specials,
            scores.ids[:rows],
            scores.logprobs[:rows],
            scores.token_logprobs[:rows],
            candidates=self.options.candidates,
        )

    def branch_requests(self, projection: Projection) -> list[tuple[int, tuple[int, ...]]]:
        options = self.options
        budget = max(options.branch_token_floor, int(options.branch_token_factor * projection.alignment.num_positions))
        requests = projection.branch_requests(options.min_branch_prob, budget, options.max_open_mass)
        limit = self.max_sequence_length
        return [(at, extra) for at, extra in requests if at + len(extra) <= limit]

    def branch_job(
        self, plan: Alignment, requests: list[tuple[int, tuple[int, ...]]], temperature: float = 1.0
    ) -> ScoringJob:
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
        projection.absorb(requests, scores.branch_ids, scores.branch_logprobs)

    def finish(self, projection: Projection, top_k: int, candidate_logprobs: np.ndarray | None = None) -> ScoreResult:
        """The response arrays; `candidate_logprobs` [P, M]: the chain rule along each requested
        candidate's path, conditioned here like the position's support."""
        ids, logprobs, token_logprobs, reason, mass, conditioning = projection.finish(
            top_k, self.options.min_consistent_mass
        )
        requested = None if candidate_logprobs is None else candidate_logprobs - conditioning[:, None]
        if not self.specials.mask:
            fill_dropped_specials(ids, logprobs, token_logprobs, reason, mass, requested)
        stats = projection.stats
        result = result_from(
            ids,
            logprobs,
            token_logprobs,
            reason,
            mass,
            branch_sequences=stats.branch_sequences,
            branch_tokens=stats.branch_tokens,
            unresolved_paths=stats.unresolved_paths,
        )
        result.conditioning = conditioning
        if requested is not None:
            requested[reason != 0] = -np.inf
            result.requested_logprobs = requested.astype(np.float32)
        return result

    def steps(
        self,
        tokens: np.ndarray,
        score_from: int,
        top_k: int,
        temperature: float,
        messages: Sequence[tuple[str, str]] = (),
        rounds: int | None = None,
        requested_ids: np.ndarray | None = None,
        teacher_prompt_ids: np.ndarray | None = None,
        score_mask: np.ndarray | None = None,
    ) -> Steps:
        """Align, the teacher pass (with the requested candidates' paths), up to `rounds` branch
        rounds (None: the session's), the result."""
        try:
            plan = self.align(tokens, score_from, messages, teacher_prompt_ids)
        except ValueError as error:  # a chat template that fails to render, a prompt beyond the context
            raise InvalidArgument(str(error)) from None
        if score_mask is not None:  # context is read as text, never projected or branched for
            plan.reason[~score_mask] = CONTEXT
        beyond = plan.teacher_ids[plan.teacher_ids >= self.model_vocab_size]
        if len(beyond):  # a token the tokenizer has and the lm head does not (sessions.TeacherVocabulary)
            raise InvalidArgument(
                f"the teacher's tokenizer writes this rollout with token id {int(beyond[0])}, which the teacher's "
                f"lm head ({self.model_vocab_size} rows) cannot read; leave that token's text out of the rollout"
            )
        paths = None
        if requested_ids is not None:
            requested_ids = np.asarray(requested_ids, dtype=np.int64)
            paths = candidate_paths(
                plan,
                requested_ids,
                self.student,
                self.text,
                self.specials,
                self.model_vocab_size,
                self.max_sequence_length,
            )
            check_branch_budget(paths, int((requested_ids >= 0).sum()))
        scores = yield self.main_job(plan, temperature, paths)
        projection = self.start(plan, scores)
        candidate_logprobs = None
        if paths is not None:
            projection.stats.branch_sequences += len(paths.branches)
            projection.stats.branch_tokens += paths.branch_tokens
            # Slot -1 (the teacher cannot write the candidate) picks the -inf after the paths' values.
            candidate_logprobs = np.append(path_logprobs(plan, paths, scores), -np.inf)[paths.slot]
        for _ in range(max(self.options.rounds if rounds is None else rounds, 0)):
            requests = self.branch_requests(projection)
            if not requests:
                break
            self.absorb(projection, requests, (yield self.branch_job(plan, requests, temperature)))
        return mask_context(self.finish(projection, top_k, candidate_logprobs), score_mask)

    def score(
        self, engine, tokens, score_from: int, top_k: int, messages=(), temperature: float = 1.0, requested_ids=None
    ) -> ScoreResult:
        """The whole request against an engine called directly (tests, benchmarks)."""
        steps = self.steps(np.asarray(tokens), score_from, top_k, temperature, messages, requested_ids=requested_ids)
        return drive(steps, engine)
