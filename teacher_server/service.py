"""The teacher service in domain terms: validate a score request, run it, build the masks.

Everything here works on numpy arrays and dataclasses; servicer.py converts to
and from protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server import __version__
from teacher_server.engines import Engine, ScoringJob
from teacher_server.errors import FailedPrecondition, InvalidArgument
from teacher_server.scheduler import Scheduler
from teacher_server.sessions import Session, SessionRegistry, StudentTokenizerSpec, TeacherVocabulary

SPECIAL = teacher_pb2.MASK_REASON_SPECIAL


@dataclass(frozen=True)
class ScoreInput:
    session_id: str
    tokens: np.ndarray  # int32 [N], student vocabulary
    score_from: int
    top_k: int


@dataclass(frozen=True)
class ScoreOutput:
    ids: np.ndarray  # int32 [P, K], student vocabulary, pad -1
    logprobs: np.ndarray  # float32 [P, K], pad -inf
    token_logprobs: np.ndarray  # float32 [P]
    mask: np.ndarray  # uint8 [P]
    reason: np.ndarray  # uint8 [P]
    coverage: float
    mean_support_mass: float


class TeacherService:
    def __init__(self, engine: Engine, teacher: TeacherVocabulary, scheduler: Scheduler, max_k: int) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.sessions = SessionRegistry(teacher)
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
        )

    def open_session(self, student: StudentTokenizerSpec | None, temperature: float) -> Session:
        return self.sessions.open(student, temperature)

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

    async def score(self, request: ScoreInput) -> ScoreOutput:
        session = self.sessions.get(request.session_id)
        if not session.same_as_teacher:
            raise FailedPrecondition(
                "this session's student tokenizer differs from the teacher's and cross-tokenizer "
                "scoring is not available in this version; open the session with same_as_teacher "
                "or use a student that shares the teacher's tokenizer"
            )
        self._validate(request, session)
        job = ScoringJob(
            token_ids=request.tokens,
            score_from=request.score_from,
            top_k=request.top_k,
            temperature=session.temperature,
            exclude_ids=session.excluded_support,
        )
        scores = await self.scheduler.submit(session.session_id, job)
        masked = session.masked_targets[request.tokens[request.score_from :]]
        mask = (~masked).astype(np.uint8)
        reason = np.where(masked, SPECIAL, teacher_pb2.MASK_REASON_OK).astype(np.uint8)
        support_mass = np.exp(scores.logprobs.astype(np.float64)).sum(axis=1)
        used = mask.astype(bool)
        return ScoreOutput(
            ids=scores.ids,
            logprobs=scores.logprobs,
            token_logprobs=scores.token_logprobs,
            mask=mask,
            reason=reason,
            coverage=float(used.mean()),
            mean_support_mass=float(support_mass[used].mean()) if used.any() else 0.0,
        )

    def _validate(self, request: ScoreInput, session: Session) -> None:
        tokens = request.tokens
        length = len(tokens)
        if length == 0:
            raise InvalidArgument("tokens is empty; send the whole rollout (prompt and completion)")
        if length > self.engine.max_sequence_length:
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
