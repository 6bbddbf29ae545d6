"""The teacher service in domain terms: sessions and who holds them, and one scoring path that
validates a request and drives its session's alignment (alignment/result.py) through the
scheduler.

Everything here works on numpy arrays and dataclasses; servicer.py converts to
and from protobuf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from teacher_server import __version__
from teacher_server.alignment.cross import MAX_ALIGNMENT_WORK
from teacher_server.alignment.result import Coverage, ScoreResult, advance
from teacher_server.engines import Engine, ScoringJob
from teacher_server.errors import InvalidArgument, ResourceExhausted
from teacher_server.scheduler import Scheduler, TeacherEngine
from teacher_server.sessions import (
    MAX_TABLE_BYTES,
    Session,
    SessionRegistry,
    SessionSettings,
    TeacherVocabulary,
    session_id_of,
)
from teacher_server.student_tokenizer import StudentTokenizerSpec, TokenizerLimits
from teacher_server.teacher_specs import DEFAULT_TEACHER
from teacher_server.tenancy import OPEN_TENANT, SessionOwners

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

# Chat messages may hold this many characters per token of the request limit (byte-level BPE
# averages about 4 characters per token of English), checked before the template renders them.
MESSAGE_CHARS_PER_TOKEN = 8
SMALL_REQUEST_BYTES = 64 * 1024  # a request without tokens or a tokenizer, with room to spare


def receive_limits(max_request_tokens: int, max_k: int, max_open_session_bytes: int) -> dict[str, int]:
    """Bytes of one request message by method: a Score (or ScoreStream entry) within the size
    limits of validate_size (packed int32 tokens, up to max_k int32 candidate ids per token, and
    messages of up to 4 UTF-8 bytes per character with some framing each), OpenSession the room
    of a large tokenizer, the others a little."""
    per_token = 4 + 4 * max_k + 4 * MESSAGE_CHARS_PER_TOKEN + 12
    score = max_request_tokens * per_token + SMALL_REQUEST_BYTES
    return {
        "Score": score,
        "ScoreStream": score,
        "OpenSession": max_open_session_bytes,
        "GetInfo": SMALL_REQUEST_BYTES,
        "GetSessionStats": SMALL_REQUEST_BYTES,
        "CloseSession": SMALL_REQUEST_BYTES,
    }


@dataclass(frozen=True)
class ScoreInput:
    session_id: str
    tokens: np.ndarray  # int32 [N], student vocabulary
    score_from: int
    top_k: int
    # The teacher's prompt in place of tokens[:score_from], as chat messages (role, content) that
    # its chat template renders, or as int64 [T] ids of its own vocabulary (not both).
    messages: tuple[tuple[str, str], ...] = ()
    teacher_prompt_ids: np.ndarray | None = None
    # uint8 [P]: 1 where the position is the student's own token, 0 where it is context the
    # student did not write (masked CONTEXT); None: all the student's.
    score_mask: np.ndarray | None = None
    # int64 [P, M] ids whose log-probabilities the result carries at each scored position (-1: none);
    # same-tokenizer sessions on engines that declare supports_requested_ids (the HTTP dialects).
    requested_ids: np.ndarray | None = None


@dataclass(frozen=True)
class TeacherInfo:
    """What GetInfo tells a client about one hosted teacher."""

    name: str
    model: str
    engine: str
    vocab_size: int
    max_k: int
    max_sequence_length: int
    dtype: str
    special_token_ids: list[int]
    eos_token_ids: list[int]
    server_version: str
    weights_sha256: str
    base: str = ""  # a LoRA adapter's base teacher


class TeacherService:
    """One hosted teacher: its engine, its sessions (shared with the teachers of its tokenizer)
    and its jobs' way to the scheduler the device's teachers share."""

    def __init__(
        self,
        engine: Engine,
        teacher: TeacherVocabulary,
        scheduler: Scheduler,
        max_k: int,
        owners: SessionOwners | None = None,
        weights_sha256: str = "",
        metrics: TeacherMetrics | None = None,
        tokenizer_limits: TokenizerLimits = TokenizerLimits(),
        max_table_bytes: int = MAX_TABLE_BYTES,
        max_alignment_work: int = MAX_ALIGNMENT_WORK,
        name: str = DEFAULT_TEACHER,
        base: str = "",
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.base = base
        self.max_alignment_work = max_alignment_work
        self.scheduler = scheduler
        self.teacher_engine = TeacherEngine(name, engine)
        self._session_ids: set[str] = set()  # this teacher's open sessions (the registry may be shared)
        self.sessions = sessions or SessionRegistry(
            teacher, engine.max_sequence_length, tokenizer_limits, max_table_bytes
        )
        # Which tenant opened which session (tenancy.py): sessions are shared, access is not.
        self.owners = owners or SessionOwners()
        self.weights_sha256 = weights_sha256
        self.metrics = metrics
        self.max_k = min(max_k, engine.vocab_size)

    def info(self) -> TeacherInfo:
        teacher = self.sessions.teacher
        return TeacherInfo(
            name=self.name,
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
            base=self.base,
        )

    def open_session(
        self, student: StudentTokenizerSpec | None, settings: SessionSettings, tenant: str = OPEN_TENANT
    ) -> Session:
        """Open or find a session; a new student tokenizer builds its alignment tables (seconds)."""
        temperature = settings.temperature
        served = self.engine.temperatures
        if served is not None and temperature not in served:
            raise InvalidArgument(
                f"the {self.engine.name} engine scores only at temperature {', '.join(map(str, served))}, "
                f"not {temperature}; open the session with temperature 1 or use a teacher served with --engine hf"
            )
        session_id = session_id_of(student, settings, self.name)
        self.owners.admit(tenant, session_id)  # at its caps: refused before any work
        session = self.sessions.open(student, settings, session_id)
        try:
            self.owners.grant(tenant, session.session_id, session.table_bytes)
        except Exception:
            if not self.owners.has_owner(session.session_id):  # built just now for a tenant over its cap
                self.sessions.close(session.session_id)
            raise
        self._session_ids.add(session_id)
        self._count_sessions()
        return session

    def holds(self, session_id: str) -> bool:
        """Whether `session_id` is an open session of this teacher."""
        return session_id in self._session_ids

    def shutdown(self) -> None:
        """Stop the workers that read students' tokenizers."""
        self.sessions.shutdown()

    def close_session(self, session_id: str, tenant: str = OPEN_TENANT) -> None:
        if self.owners.release(tenant, session_id):  # the last tenant holding it
            self.sessions.close(session_id)
            self._session_ids.discard(session_id)
        self._count_sessions()

    def _count_sessions(self) -> None:
        if self.metrics is not None:
            self.metrics.sessions_open.set(self.owners.count())

    async def score(self, request: ScoreInput, tenant: str = OPEN_TENANT) -> ScoreResult:
        """Validate, then drive the session's alignment: each teacher pass through the scheduler,
        heavy array work between passes in a worker thread (the event loop keeps serving)."""
        self.owners.check(tenant, request.session_id)  # another tenant's session is NOT_FOUND
        session = self.sessions.get(request.session_id)
        self._validate(request, session)
        rounds = None if self.engine.supports_branches else 0  # None: the session's own
        steps = session.alignment.steps(
            request.tokens,
            request.score_from,
            request.top_k,
            session.temperature,
            request.messages,
            rounds,
            request.requested_ids,
            request.teacher_prompt_ids,
            None if request.score_mask is None else request.score_mask.astype(bool),
        )
        # Rendering and tokenizing messages takes time in proportion to their text: off the event loop.
        heavy = session.alignment.heavy_steps or bool(request.messages)
        step = await asyncio.to_thread(advance, steps, None) if heavy else advance(steps, None)
        while isinstance(step, ScoringJob):
            scores = await self.scheduler.submit(session.session_id, step, tenant, self.teacher_engine)
            step = await asyncio.to_thread(advance, steps, scores) if heavy else advance(steps, scores)
        session.stats.record(step.counts)
        return step

    def session_stats(self, session_id: str, tenant: str = OPEN_TENANT) -> tuple[int, Coverage]:
        """(requests, coverage totals) of a session this tenant holds."""
        self.owners.check(tenant, session_id)
        return self.sessions.get(session_id).stats.snapshot()

    def _validate(self, request: ScoreInput, session: Session) -> None:
        """What every alignment needs of a request (each checks the rest: the context, identity.py)."""
        tokens = request.tokens
        length = len(tokens)
        if length == 0:
            raise InvalidArgument("tokens is empty; send the whole rollout (prompt and completion)")
        messages, teacher_prompt = request.messages, request.teacher_prompt_ids
        teacher_length = 0 if teacher_prompt is None else len(teacher_prompt)
        self.validate_size(length + teacher_length, len(messages), lambda: sum(len(r) + len(c) for r, c in messages))
        self._validate_work(request, session)
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
        if request.requested_ids is not None:
            self._validate_requested(request.requested_ids, length - request.score_from, session)
        if teacher_prompt is not None:
            self._validate_teacher_prompt(teacher_prompt, bool(messages))
        if request.score_mask is not None:
            self._validate_score_mask(request.score_mask, length - request.score_from)

    def validate_size(self, tokens: int, messages: int, message_chars: Callable[[], int]) -> None:
        """A request's size against the per-request limit, before any work on it (front ends call
        it before they convert the request): the student's tokens (the teacher's job is checked
        again when it is queued) and the chat messages, at most as many as the limit and
        MESSAGE_CHARS_PER_TOKEN characters per token of it in all (counted once their number passed)."""
        limit = self.scheduler.limits.max_request_tokens
        if tokens > limit:
            raise ResourceExhausted(
                f"the rollout has {tokens} tokens, over this teacher's limit of {limit} per request; "
                "send shorter rollouts"
            )
        if messages > limit:
            raise ResourceExhausted(f"{messages} messages are over this teacher's limit of {limit}; send fewer")
        characters = message_chars()
        if characters > MESSAGE_CHARS_PER_TOKEN * limit:
            raise ResourceExhausted(
                f"the messages hold {characters} characters, over this teacher's limit of "
                f"{MESSAGE_CHARS_PER_TOKEN * limit} ({MESSAGE_CHARS_PER_TOKEN} per token of the request limit); "
                "send a shorter prompt"
            )

    def _validate_work(self, request: ScoreInput, session: Session) -> None:
        """A cross-tokenizer request's alignment work (its session's options) against the limit."""
        options = getattr(session.alignment, "options", None)
        if options is None:
            return
        positions = len(request.tokens) - request.score_from
        work = positions * options.relative_work()
        if work > self.max_alignment_work:
            raise ResourceExhausted(
                f"{positions} scored positions with this session's alignment options ({options.relative_work():.1f} "
                f"times the default work per position) are over this teacher's limit of {self.max_alignment_work} "
                "positions at the default options; send shorter rollouts or open the session with smaller options"
            )

    @staticmethod
    def _validate_score_mask(score_mask: np.ndarray, positions: int) -> None:
        if score_mask.shape != (positions,):
            raise InvalidArgument(
                f"score_mask must have one entry per scored position, [{positions}], got {list(score_mask.shape)}"
            )
        if positions and int(score_mask.max()) > 1:
            raise InvalidArgument("score_mask holds 1 (the student's own token) or 0 (context) only")
        if positions and not score_mask.any():
            raise InvalidArgument("score_mask is 0 everywhere: no position is the student's, so nothing is scored")
        if positions and score_mask[0] == 0:
            raise InvalidArgument(
                "score_mask[0] is 0: the first scored position is context; context before the student's "
                "first token is prompt, so move score_from past it"
            )

    def _validate_teacher_prompt(self, ids: np.ndarray, with_messages: bool) -> None:
        if with_messages:
            raise InvalidArgument("send the teacher's prompt as messages or as teacher_prompt_ids, not both")
        if ids.ndim != 1 or len(ids) == 0:
            raise InvalidArgument(f"teacher_prompt_ids must be a non-empty [T] array, got shape {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.engine.vocab_size:
            raise InvalidArgument(
                f"teacher_prompt_ids holds id {low if low < 0 else high}, outside the teacher's vocabulary "
                f"[0, {self.engine.vocab_size}) (GetInfo.vocab_size): they are ids of the teacher's tokenizer"
            )

    def _validate_requested(self, requested: np.ndarray, positions: int, session: Session) -> None:
        if not self.engine.supports_requested_ids:
            raise InvalidArgument(f"the {self.engine.name} engine does not score requested ids; use the hf engine")
        if requested.ndim != 2 or len(requested) != positions or requested.shape[1] > self.max_k:
            raise InvalidArgument(
                f"requested ids must be [positions = {positions}, at most {self.max_k}] ids, got {list(requested.shape)}"
            )
        if requested.size and int(requested.max()) >= session.student_vocab_size:
            raise InvalidArgument(
                f"requested id {int(requested.max())} is outside the vocabulary [0, {session.student_vocab_size})"
            )
