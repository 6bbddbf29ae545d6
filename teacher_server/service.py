"""The teacher service in domain terms: validate a score request, run it, build the masks.

Everything here works on numpy arrays and dataclasses; servicer.py converts to
and from protobuf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Generator

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server import __version__
from teacher_server.alignment.session import Coverage, CrossResult
from teacher_server.engines import Engine, ScoringJob, TeacherScores
from teacher_server.errors import FailedPrecondition, InvalidArgument
from teacher_server.scheduler import Scheduler
from teacher_server.sessions import Session, SessionRegistry, SessionSettings, StudentTokenizerSpec, TeacherVocabulary
from teacher_server.tenancy import OPEN_TENANT, SessionOwners

SPECIAL = teacher_pb2.MASK_REASON_SPECIAL


@dataclass(frozen=True)
class ScoreInput:
    session_id: str
    tokens: np.ndarray  # int32 [N], student vocabulary
    score_from: int
    top_k: int
    # The prompt as chat messages (role, content); cross-tokenizer sessions render it
    # with the teacher's chat template. Identical tokenizers score the tokens as sent.
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ScoreOutput:
    ids: np.ndarray  # int32 [P, K], student vocabulary, pad -1
    logprobs: np.ndarray  # float32 [P, K], pad -inf
    token_logprobs: np.ndarray  # float32 [P]
    mask: np.ndarray  # uint8 [P]
    reason: np.ndarray  # uint8 [P]
    coverage: float
    mean_support_mass: float
    counts: Coverage = field(default_factory=Coverage)  # per-reason counts, retained mass


class TeacherService:
    def __init__(
        self,
        engine: Engine,
        teacher: TeacherVocabulary,
        scheduler: Scheduler,
        max_k: int,
        owners: SessionOwners | None = None,
        weights_sha256: str = "",
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.sessions = SessionRegistry(teacher, engine.max_sequence_length)
        # Which tenant opened which session (tenancy.py): sessions are shared, access is not.
        self.owners = owners or SessionOwners()
        self.weights_sha256 = weights_sha256
        self.max_k = min(max_k, engine.vocab_size)

    def info(self) -> teacher_pb2.GetInfoResponse:
        teacher = self.sessions.teacher
        return teacher_pb2.GetInfoResponse(
            model=self.engine.model_name,
            engine=self.engine.name,
            vocab_size=self.engine.vocab_size,
            max_k=self.max_k,
            max_sequence_length=self.engine.max_sequence_length,
            dtype=self.engine.dtype,
            special_token_ids=sorted(teacher.special_ids),
            eos_token_ids=sorted(teacher.eos_ids),
            server_version=__version__,
            weights_sha256=self.weights_sha256,
        )

    def open_session(
        self, student: StudentTokenizerSpec | None, temperature: float | SessionSettings, tenant: str = OPEN_TENANT
    ) -> Session:
        """Open or find a session; a new student tokenizer builds its alignment tables (seconds)."""
        settings = temperature if isinstance(temperature, SessionSettings) else SessionSettings(temperature=temperature)
        temperature = settings.temperature
        served = getattr(self.engine, "temperatures", None)  # None: any temperature (engines/base.py)
        if served is not None and temperature not in served:
            raise InvalidArgument(
                f"the {self.engine.name} engine scores only at temperature {', '.join(map(str, served))}, "
                f"not {temperature}; open the session with temperature 1 or use a teacher served with --engine hf"
            )
        session = self.sessions.open(student, settings)
        try:
            self.owners.grant(tenant, session.session_id)
        except Exception:
            if not self.owners.has_owner(session.session_id):  # built just now for a tenant over its cap
                self.sessions.close(session.session_id)
            raise
        return session

    def close_session(self, session_id: str, tenant: str = OPEN_TENANT) -> None:
        if self.owners.release(tenant, session_id):  # the last tenant holding it
            self.sessions.close(session_id)

    async def score(self, request: ScoreInput, tenant: str = OPEN_TENANT) -> ScoreOutput:
        self.owners.check(tenant, request.session_id)  # another tenant's session is NOT_FOUND
        session = self.sessions.get(request.session_id)
        if not session.same_as_teacher:
            output = await self._score_cross(request, session, tenant)
            session.stats.record(output.counts)
            return output
        self._validate(request, session)
        job = ScoringJob(
            token_ids=request.tokens,
            score_from=request.score_from,
            top_k=request.top_k,
            temperature=session.temperature,
            exclude_ids=session.excluded_support,
        )
        scores = await self.scheduler.submit(session.session_id, job, tenant)
        masked = session.masked_targets[request.tokens[request.score_from :]]
        mask = (~masked).astype(np.uint8)
        reason = np.where(masked, SPECIAL, teacher_pb2.MASK_REASON_OK).astype(np.uint8)
        support_mass = np.exp(scores.logprobs.astype(np.float64)).sum(axis=1)
        used = mask.astype(bool)
        counts = Coverage(
            positions=len(mask),
            with_distribution=int(used.sum()),
            special=int((~used).sum()),
            retained_mass_sum=float(support_mass[used].sum()),
        )
        session.stats.record(counts)
        return ScoreOutput(
            ids=scores.ids,
            logprobs=scores.logprobs,
            token_logprobs=scores.token_logprobs,
            mask=mask,
            reason=reason,
            coverage=float(used.mean()),
            mean_support_mass=float(support_mass[used].mean()) if used.any() else 0.0,
            counts=counts,
        )

    def session_stats(self, session_id: str, tenant: str = OPEN_TENANT) -> Session:
        self.owners.check(tenant, session_id)
        return self.sessions.get(session_id)

    async def _score_cross(self, request: ScoreInput, session: Session, tenant: str) -> ScoreOutput:
        """Different tokenizers: align, one teacher pass, bounded branch rounds, projection (DESIGN.md 6)."""
        cross = session.cross
        if cross is None:
            raise FailedPrecondition(session.cross_error)
        self._validate(request, session, cross=True)
        # The array work runs in a worker thread so the event loop keeps serving RPCs.
        try:
            plan = await asyncio.to_thread(cross.align, request.tokens, request.score_from, request.messages)
        except ValueError as error:  # a chat template that fails to render, a prompt beyond the context
            raise InvalidArgument(str(error)) from None
        steps = cross.steps(plan, request.top_k, session.temperature, cross.rounds_for(self.engine))
        step: ScoringJob | CrossResult = next(steps)
        while isinstance(step, ScoringJob):
            scores = await self.scheduler.submit(session.session_id, step, tenant)
            step = await asyncio.to_thread(_advance, steps, scores)
        result = step
        counts = result.coverage
        return ScoreOutput(
            ids=result.ids,
            logprobs=result.logprobs,
            token_logprobs=result.token_logprobs,
            mask=result.mask,
            reason=result.reason,
            coverage=counts.coverage,
            mean_support_mass=counts.mean_retained_mass,
            counts=counts,
        )

    def _validate(self, request: ScoreInput, session: Session, cross: bool = False) -> None:
        tokens = request.tokens
        length = len(tokens)
        if length == 0:
            raise InvalidArgument("tokens is empty; send the whole rollout (prompt and completion)")
        # A cross-tokenizer rollout is measured in teacher tokens: what exceeds the
        # teacher's context is masked BEYOND_CONTEXT instead.
        if not cross and length > self.engine.max_sequence_length:
            raise InvalidArgument(
                f"tokens has {length} ids but the teacher's context holds {self.engine.max_sequence_length}; "
                "truncate the rollout or cap max_new_tokens"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= session.student_vocab_size:
            bad = low if low < 0 else high
            raise InvalidArgument(
                f"token id {bad} is outside the session's vocabulary [0, {session.student_vocab_size}); "
                "was the rollout tokenized with the tokenizer this session was opened with?"
            )
        if not 1 <= request.score_from < length:
            raise InvalidArgument(
                f"score_from must satisfy 1 <= score_from < len(tokens) = {length}, got {request.score_from} "
                "(score_from is normally the prompt length)"
            )
        if not 1 <= request.top_k <= self.max_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_k} (GetInfo.max_k), got {request.top_k}")


def _advance(steps: Generator[ScoringJob, TeacherScores, CrossResult], scores: TeacherScores) -> ScoringJob | CrossResult:
    """The next teacher pass of a cross-tokenizer request, or its result when none is left.

    (StopIteration cannot travel through asyncio.to_thread: a future refuses it.)
    """
    try:
        return steps.send(scores)
    except StopIteration as done:
        return done.value
