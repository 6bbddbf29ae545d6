"""Sessions: one per (student tokenizer, settings), content-addressed and shared.

A session fixes how a student's rollouts are read: which vocabulary its ids are
in, which target tokens carry no loss (special/control tokens, except
end-of-sequence) and which teacher tokens are never offered as support. Tables
are built once per content hash; every client that opens a session with the
same tokenizer and settings gets the same id, on every replica, so a client can
re-open transparently after a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import Future
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from teacher_server.alignment.cross import CrossOptions, CrossTokenizer
from teacher_server.alignment.identity import IdentityAlignment
from teacher_server.alignment.result import Coverage, Steps
from teacher_server.alignment.specials import PairError, SpecialMap, SpecialVocab, special_map
from teacher_server.alignment.chat import TeacherChat
from teacher_server.alignment.text import TeacherText
from teacher_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from teacher_server.sandbox import return_freed_memory
from teacher_server.student_tokenizer import (
    StudentReading,
    StudentTokenizers,
    StudentTokenizerSpec,
    TokenizerLimits,
    teacher_chat_of,
    teacher_text_of,
)
from teacher_server.teacher_specs import DEFAULT_TEACHER
from teacher_server.tenancy import unknown_session

log = logging.getLogger(__name__)

# Memory all sessions' tables may hold together (the student's side of each pair; the teacher's
# own tables are shared): past it OpenSession is RESOURCE_EXHAUSTED until sessions close.
MAX_TABLE_BYTES = 8 << 30


@dataclass(frozen=True)
class TeacherVocabulary:
    """What the service needs to know of the teacher's own tokenizer."""

    vocab: dict[str, int]
    special_ids: frozenset[int]
    eos_ids: frozenset[int]
    model_vocab_size: int  # rows of the lm head; may exceed len(vocab) (padded embeddings)
    # For cross-tokenizer sessions: the teacher's tokenizer.json text, special tokens and chat template.
    tokenizer_json: str = ""
    special_tokens: tuple[str, ...] = ()
    chat_template: str = ""
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_pretrained(cls, path: str, model_vocab_size: int) -> "TeacherVocabulary":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        return cls(
            vocab=dict(tokenizer.get_vocab()),
            special_ids=frozenset(tokenizer.all_special_ids),
            eos_ids=frozenset(eos_ids),
            model_vocab_size=model_vocab_size,
            tokenizer_json=backend.to_str() if backend is not None else "",
            special_tokens=tuple(tokenizer.all_special_tokens),
            chat_template=template or "",
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
        )

    # Real checkpoints disagree with their tokenizers both ways: a tokenizer with ids beyond the
    # lm head (an added token the head never got; the teacher can never predict it) and a head
    # padded past the tokenizer (rows no token owns). Neither may reach the support or crash.
    @cached_property
    def beyond_head(self) -> np.ndarray:
        """Token ids of the tokenizer that the lm head has no row for, sorted."""
        return np.asarray(sorted(i for i in self.vocab.values() if i >= self.model_vocab_size), dtype=np.int64)

    @cached_property
    def unowned_rows(self) -> np.ndarray:
        """Rows of the lm head that no token of the tokenizer owns, sorted."""
        owned = np.zeros(self.model_vocab_size, dtype=bool)
        ids = np.fromiter(self.vocab.values(), dtype=np.int64, count=len(self.vocab))
        owned[ids[ids < self.model_vocab_size]] = True
        return np.flatnonzero(~owned).astype(np.int64)

    @cached_property
    def special_vocab(self) -> SpecialVocab:
        """Special and end-of-sequence tokens by string, for special-token pairing."""
        special = {token: index for token, index in self.vocab.items() if index in self.special_ids | self.eos_ids}
        return SpecialVocab(self.vocab, special)

    def describe_head(self) -> str:
        """One line on how the tokenizer and the lm head agree."""
        beyond, unowned = self.beyond_head, self.unowned_rows
        if not len(beyond) and not len(unowned):
            return f"tokenizer and lm head agree: {self.model_vocab_size} tokens"
        names = {index: token for token, index in self.vocab.items()}
        shown = ", ".join(f"{names[int(i)]!r}={int(i)}" for i in beyond[:5]) + (" ..." if len(beyond) > 5 else "")
        return (
            f"tokenizer ({len(self.vocab)} tokens) and lm head ({self.model_vocab_size} rows) disagree: "
            f"{len(beyond)} token id(s) beyond the head are never scored or offered"
            + (f" ({shown})" if len(beyond) else "")
            + f"; {len(unowned)} row(s) no token owns are never offered as support"
        )


@dataclass(frozen=True)
class SessionSettings:
    """What a session is opened with besides the tokenizer (part of its content hash)."""

    temperature: float = 1.0
    special_token_pairs: tuple[tuple[str, str], ...] = ()
    pair_eos: bool = True
    # False (an ablation): special targets stay in the loss and special tokens in the support
    mask_specials: bool = True
    options: CrossOptions = CrossOptions()


@dataclass
class SessionStats:
    requests: int = 0
    totals: Coverage = field(default_factory=Coverage)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, coverage: Coverage) -> None:
        with self.lock:
            self.requests += 1
            self.totals.add(coverage)

    def snapshot(self) -> tuple[int, Coverage]:
        """(requests, a copy of the totals), consistent with each other."""
        with self.lock:
            return self.requests, dataclasses.replace(self.totals)


@dataclass(frozen=True)
class UnalignedTokenizers:
    """A student tokenizer the teacher's own cannot be aligned with: the session opens (its id is
    stable), and scoring answers FAILED_PRECONDITION with the reason."""

    reason: str
    heavy_steps = False

    def steps(self, *request) -> Steps:
        raise FailedPrecondition(self.reason)


@dataclass(frozen=True)
class Session:
    session_id: str
    student_vocab_size: int
    temperature: float
    alignment: IdentityAlignment | CrossTokenizer | UnalignedTokenizers
    special_token_pairs: tuple[tuple[str, str], ...] = ()
    table_bytes: int = 0  # memory of the student's side of its tables (the budgets count it)
    student_key: str = ""  # student_key_of its tokenizer: sessions of one tokenizer share its tables
    stats: SessionStats = field(default_factory=SessionStats, compare=False)

    @property
    def same_as_teacher(self) -> bool:
        return isinstance(self.alignment, IdentityAlignment)


class SessionRegistry:
    def __init__(
        self,
        teacher: TeacherVocabulary,
        max_sequence_length: int = 2**31 - 1,
        limits: TokenizerLimits = TokenizerLimits(),
        max_table_bytes: int = MAX_TABLE_BYTES,
    ) -> None:
        self.teacher = teacher
        self.max_sequence_length = max_sequence_length
        self.max_table_bytes = max_table_bytes
        self.tokenizers = StudentTokenizers(teacher, limits)  # student tokenizers are read in workers
        self._sessions: dict[str, Session] = {}
        self._teacher_text: TeacherText | None = None
        self._teacher_error = ""
        self._teacher_chat: TeacherChat | None = None
        self._chat_lock = threading.Lock()  # held while the chat rendering is built (a second)
        self._lock = threading.Lock()
        self._building: dict[str, Future] = {}  # session id -> the build under way
        # student_key_of -> the worker's reading of that tokenizer, while it is read or a session holds it
        self._readings: dict[str, Future] = {}

    def open(
        self, student: StudentTokenizerSpec | None, settings: SessionSettings, session_id: str | None = None
    ) -> Session:
        """Open (or find) the session for `student` (None = the teacher's own tokenizer); `session_id`:
        session_id_of(student, settings) if the caller has it already (it hashes the whole tokenizer)."""
        temperature = settings.temperature
        if not (temperature > 0 and np.isfinite(temperature)):
            raise InvalidArgument(f"temperature must be a positive number, got {temperature}")
        session_id = session_id or session_id_of(student, settings)
        with self._lock:
            found = self._sessions.get(session_id)
            building = self._building.get(session_id)
            owner = found is None and building is None
            if owner:
                self._check_budget(0)
                building = self._building[session_id] = Future()
        if found is not None:
            return found
        if not owner:  # the same tokenizer is being built for another caller: one build, its result
            return building.result()
        try:
            built = self._build(session_id, student, settings)
            with self._lock:
                if session_id not in self._sessions:
                    self._check_budget(built.table_bytes)
                found = self._sessions.setdefault(session_id, built)
            building.set_result(found)
            return found
        except BaseException as error:
            building.set_exception(error)
            raise
        finally:
            with self._lock:
                del self._building[session_id]
                self._forget_unused_readings()

    def _check_budget(self, adding: int) -> None:
        held = self.table_bytes()
        if held >= self.max_table_bytes or held + adding > self.max_table_bytes:
            raise ResourceExhausted(
                f"the sessions' tables would hold {(held + adding) >> 20} MiB, over this teacher's budget of "
                f"{self.max_table_bytes >> 20} MiB (--max-table-mib); retry once other sessions have closed",
                retry_after_s=60.0,
            )

    def table_bytes(self) -> int:
        """Memory the open sessions' tables hold (those of one tokenizer counted once)."""
        held = {session.student_key: session.table_bytes for session in list(self._sessions.values())}
        return sum(held.values())

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise unknown_session(session_id) from None

    def close(self, session_id: str) -> None:
        self.get(session_id)
        with self._lock:
            del self._sessions[session_id]
            self._forget_unused_readings()
        # Off the caller's thread (CloseSession runs on the event loop): trimming takes milliseconds.
        threading.Thread(target=return_freed_memory, name="return-freed-memory", daemon=True).start()

    def shutdown(self) -> None:
        """Stop the tokenizer workers."""
        self.tokenizers.close()

    def _read(self, student: StudentTokenizerSpec) -> tuple[str, StudentReading]:
        """(its key, the worker's reading of `student`): read once per tokenizer content, shared by
        the callers opening it at once and by the sessions that hold it, whatever their settings."""
        key = student_key_of(student)
        with self._lock:
            reading = self._readings.get(key)
            owner = reading is None
            if owner:
                reading = self._readings[key] = Future()
        if not owner:
            return key, reading.result()
        try:
            reading.set_result(self.tokenizers.read(student))
        except BaseException as error:
            with self._lock:
                del self._readings[key]
            reading.set_exception(error)
            raise
        return key, reading.result()

    def _forget_unused_readings(self) -> None:
        """Drop the readings no session holds (called with the lock held); their memory goes with
        the last session that used them."""
        held = {session.student_key for session in self._sessions.values()}
        for key in [key for key, reading in self._readings.items() if reading.done() and key not in held]:
            del self._readings[key]

    def teacher_text(self) -> TeacherText | None:
        """The teacher's side of alignment, built once; None (and a reason) if it cannot be aligned."""
        with self._lock:
            if self._teacher_text is not None or self._teacher_error:
                return self._teacher_text
        text, error = teacher_text_of(self.teacher, self.teacher_chat())
        with self._lock:
            self._teacher_text, self._teacher_error = text, error
        return text

    def teacher_chat(self) -> TeacherChat | None:
        """The teacher's chat rendering, built once; None if its tokenizer is not a fast one."""
        with self._chat_lock:
            if self._teacher_chat is None:
                self._teacher_chat = teacher_chat_of(self.teacher)
            return self._teacher_chat

    def _build_cross(
        self,
        session_id: str,
        student: StudentTokenizerSpec,
        settings: SessionSettings,
        key: str,
        reading: StudentReading,
    ) -> Session:
        common = dict(
            session_id=session_id,
            student_vocab_size=reading.vocab_size,
            temperature=settings.temperature,
            student_key=key,
        )
        text = self.teacher_text()
        if text is None or reading.unaligned:
            reason = (
                f"this session's student tokenizer differs from the teacher's, and "
                f"{reading.unaligned or self._teacher_error}; "
                "open the session with same_as_teacher or use a student that shares the teacher's tokenizer"
            )
            return Session(**common, alignment=UnalignedTokenizers(reason))
        tables = self.tokenizers.attach(reading, text, student.tokenizer_json, key)
        teacher = self.teacher
        specials = _paired_specials(
            tables.student.special_vocab, text.table.special_vocab, student.eos_tokens, teacher, settings
        )
        cross = CrossTokenizer.build(
            tables.student, text, specials, teacher.model_vocab_size, self.max_sequence_length, settings.options, tables
        )
        return Session(**common, alignment=cross, special_token_pairs=specials.pairs, table_bytes=reading.nbytes)

    def _build(self, session_id: str, student: StudentTokenizerSpec | None, settings: SessionSettings) -> Session:
        teacher = self.teacher
        if student is not None:
            key, reading = self._read(student)
            if not reading.same_as_teacher:
                return self._build_cross(session_id, student, settings, key, reading)
        # Identity alignment: the student's ids are the teacher's ids.
        for student_token, teacher_token in settings.special_token_pairs:
            if student_token != teacher_token:
                raise InvalidArgument(
                    f"special-token pair ({student_token!r}, {teacher_token!r}): the student has the teacher's "
                    "own tokenizer, so a special token can only be paired with itself"
                )
        vocab = teacher.special_vocab
        eos_tokens = [token for token, index in vocab.special.items() if index in teacher.eos_ids]
        specials = _paired_specials(vocab, vocab, eos_tokens, teacher, settings)
        return Session(
            session_id=session_id,
            student_vocab_size=teacher.model_vocab_size,
            temperature=settings.temperature,
            alignment=IdentityAlignment.build(
                vocab,
                specials,
                teacher.unowned_rows,
                teacher.model_vocab_size,
                self.max_sequence_length,
                self.teacher_chat,
            ),
            special_token_pairs=specials.pairs,
        )


def _paired_specials(
    student: SpecialVocab,
    teacher_vocab: SpecialVocab,
    student_eos: tuple[str, ...] | list[str],
    teacher: TeacherVocabulary,
    settings: SessionSettings,
) -> SpecialMap:
    try:
        return special_map(
            student,
            teacher_vocab,
            student_eos,
            sorted(teacher.eos_ids),
            settings.special_token_pairs,
            settings.pair_eos,
            settings.mask_specials,
        )
    except PairError as reason:
        raise InvalidArgument(str(reason)) from None


def student_key_of(student: StudentTokenizerSpec) -> str:
    """The content hash of a student tokenizer as sent (what the build worker reads)."""
    return hashlib.sha256(json.dumps(student.__dict__, sort_keys=True).encode()).hexdigest()


def session_id_of(
    student: StudentTokenizerSpec | None, settings: SessionSettings, teacher: str = DEFAULT_TEACHER
) -> str:
    """The content-addressed id of the session for `student` and `settings` with `teacher`."""
    described = {"student": None if student is None else student.__dict__, "temperature": float(settings.temperature)}
    if teacher != DEFAULT_TEACHER:  # the one teacher of `--model` keeps the ids it always had
        described["teacher"] = teacher
    if settings != SessionSettings(temperature=settings.temperature):  # ids of default sessions stay as they were
        described["pairs"] = [list(pair) for pair in settings.special_token_pairs]
        described["pair_eos"] = settings.pair_eos
        # Options at their defaults are left out: a new option keeps the ids of every session that
        # leaves it alone, so clients re-open the same sessions after an upgrade.
        defaults = CrossOptions()
        described["options"] = {
            key.name: getattr(settings.options, key.name)
            for key in dataclasses.fields(CrossOptions)
            if getattr(settings.options, key.name) != getattr(defaults, key.name)
        }
        if not settings.mask_specials:
            described["mask_specials"] = False
    content = json.dumps(described, sort_keys=True)
    return "s-" + hashlib.sha256(content.encode()).hexdigest()[:24]
