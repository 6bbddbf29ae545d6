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
from dataclasses import dataclass

import numpy as np

from teacher_server.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class TeacherVocabulary:
    """What the service needs to know of the teacher's own tokenizer."""

    vocab: dict[str, int]
    special_ids: frozenset[int]
    eos_ids: frozenset[int]
    model_vocab_size: int  # rows of the lm head; may exceed len(vocab) (padded embeddings)

    @classmethod
    def from_pretrained(cls, path: str, model_vocab_size: int) -> "TeacherVocabulary":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return cls(
            vocab=dict(tokenizer.get_vocab()),
            special_ids=frozenset(tokenizer.all_special_ids),
            eos_ids=frozenset(eos_ids),
            model_vocab_size=model_vocab_size,
        )


@dataclass(frozen=True)
class StudentTokenizerSpec:
    """A student's Hugging Face fast tokenizer as sent in OpenSession."""

    tokenizer_json: str
    special_tokens: tuple[str, ...] = ()
    eos_tokens: tuple[str, ...] = ()
    chat_template: str = ""


@dataclass(frozen=True)
class Session:
    session_id: str
    same_as_teacher: bool
    student_vocab_size: int
    temperature: float
    # bool [student_vocab_size]: a position whose target is one of these is masked (SPECIAL).
    masked_targets: np.ndarray
    # teacher ids never offered as support (special tokens other than EOS, embedding padding).
    excluded_support: np.ndarray


class SessionRegistry:
    def __init__(self, teacher: TeacherVocabulary) -> None:
        self.teacher = teacher
        self._sessions: dict[str, Session] = {}

    def open(self, student: StudentTokenizerSpec | None, temperature: float) -> Session:
        """Open (or find) the session for `student` (None = the teacher's own tokenizer)."""
        if not (temperature > 0 and np.isfinite(temperature)):
            raise InvalidArgument(f"temperature must be a positive number, got {temperature}")
        session_id = _session_id(student, temperature)
        if session_id not in self._sessions:
            self._sessions[session_id] = self._build(session_id, student, temperature)
        return self._sessions[session_id]

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(
                f"unknown session_id {session_id!r}: sessions live as long as the teacher process; "
                "call OpenSession again (the same tokenizer gives the same id)"
            ) from None

    def close(self, session_id: str) -> None:
        self.get(session_id)
        del self._sessions[session_id]

    def _build(self, session_id: str, student: StudentTokenizerSpec | None, temperature: float) -> Session:
        teacher = self.teacher
        if student is not None:
            student_vocab = _validated_vocab(student)
            if student_vocab != teacher.vocab:
                return Session(
                    session_id=session_id,
                    same_as_teacher=False,
                    student_vocab_size=max(student_vocab.values()) + 1,
                    temperature=temperature,
                    masked_targets=np.zeros(0, dtype=bool),
                    excluded_support=np.zeros(0, dtype=np.int64),
                )
        # Identity alignment: the student's ids are the teacher's ids.
        masked = np.zeros(teacher.model_vocab_size, dtype=bool)
        masked[sorted(teacher.special_ids - teacher.eos_ids)] = True
        padding_rows = np.arange(len(teacher.vocab), teacher.model_vocab_size)
        excluded = np.union1d(np.flatnonzero(masked), padding_rows).astype(np.int64)
        return Session(
            session_id=session_id,
            same_as_teacher=True,
            student_vocab_size=teacher.model_vocab_size,
            temperature=temperature,
            masked_targets=masked,
            excluded_support=excluded,
        )


def _session_id(student: StudentTokenizerSpec | None, temperature: float) -> str:
    content = json.dumps(
        {"student": None if student is None else student.__dict__, "temperature": float(temperature)},
        sort_keys=True,
    )
    return "s-" + hashlib.sha256(content.encode()).hexdigest()[:24]


def _validated_vocab(student: StudentTokenizerSpec) -> dict[str, int]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(student.tokenizer_json)
    except Exception as error:
        raise InvalidArgument(
            f"tokenizer_json is not a valid Hugging Face tokenizer.json: {error}; "
            "send the text of the student's tokenizer.json (tokenizer.backend_tokenizer.to_str())"
        ) from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [token for token in (*student.special_tokens, *student.eos_tokens) if token not in vocab]
    if missing:
        raise InvalidArgument(f"special or eos tokens not in the tokenizer's vocabulary: {missing}")
    return vocab
