"""A student's tokenizer, read in the sandbox (sandbox.py): nothing a tenant sends as a tokenizer
is parsed, encoded with or turned into tables by the serving process.

One worker builds sessions' tables (`read_student`: sizes from the JSON first, then the parse, the
probe and the tables, each phase under its own CPU limit); another encodes texts with students'
tokenizers while requests are scored (`SandboxedEncoder`, for pair.first_after). A tokenizer that
fails or runs past a limit is refused with INVALID_ARGUMENT naming what it ran into; a session
whose tokenizer fails later, while scoring, refuses every further request the same way.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from teacher_server.alignment.byte_tables import (
    UnsupportedTokenizer,
    build_byte_table,
    byte_table,
    checked_table,
    parsed_tokenizer,
)
from teacher_server.alignment.packed_vocab import PackedVocab
from teacher_server.alignment.pair import PairTables, build_pair_tables, trie_of
from teacher_server.alignment.chat import TeacherChat
from teacher_server.alignment.text import TeacherText, encoded_texts, plain_tokenizer
from teacher_server.errors import InvalidArgument, ResourceExhausted
from teacher_server.sandbox import Limits, Sandbox, SandboxBusy, SandboxFailure, phase

if TYPE_CHECKING:
    from teacher_server.sessions import TeacherVocabulary

# Largest student token id + 1 a session accepts: twice the largest real vocabularies (Gemma 3:
# 262,144). A session's tables are sized by it, so one odd id could otherwise cost gigabytes.
MAX_STUDENT_VOCAB = 1 << 19


@dataclass(frozen=True)
class TokenizerLimits:
    """What reading one student tokenizer may cost (README, "Operating a shared teacher")."""

    max_chars: int = 40 << 20  # of tokenizer.json (Gemma 3's, the largest common one, has 33M)
    parse_cpu_s: float = 20.0  # parsing the JSON and the tokenizer
    probe_cpu_s: float = 2.0  # encoding the probe text (at most byte_tables.PROBE_CHARS characters)
    build: Limits = Limits(cpu_s=120.0, wall_s=300.0, memory_bytes=3 << 30)  # the tables
    encode: Limits = Limits(cpu_s=10.0, wall_s=30.0, memory_bytes=2 << 30)  # one batch of texts while scoring
    max_waiting_builds: int = 8  # OpenSessions queued for the build worker before RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class StudentTokenizerSpec:
    """A student's Hugging Face fast tokenizer as sent in OpenSession."""

    tokenizer_json: str
    special_tokens: tuple[str, ...] = ()
    eos_tokens: tuple[str, ...] = ()
    chat_template: str = ""


@dataclass(frozen=True)
class StudentReading:
    """What the build worker learnt of a student tokenizer."""

    vocab_size: int  # largest id + 1
    same_as_teacher: bool = False
    unaligned: str = ""  # why the teacher's own tokenizer cannot be aligned (the session opens anyway)
    tables: PairTables | None = None  # the student's side only (attach() adds the teacher's)
    nbytes: int = 0  # memory the student's side of the tables holds


def teacher_chat_of(teacher: TeacherVocabulary) -> TeacherChat | None:
    """The teacher's chat rendering (None without a tokenizer.json: not a fast tokenizer)."""
    if not teacher.tokenizer_json:
        return None
    return TeacherChat(teacher.tokenizer_json, teacher.chat_template, teacher.bos_token, teacher.eos_token)


def teacher_text_of(teacher: TeacherVocabulary, chat: TeacherChat | None = None) -> tuple[TeacherText | None, str]:
    """The teacher's side of alignment (with `chat`, its chat rendering, if already built), or
    None and why it cannot be aligned."""
    chat = chat or teacher_chat_of(teacher)
    if chat is None:
        return None, "the teacher's tokenizer has no tokenizer.json (not a fast tokenizer)"
    try:
        table = byte_table(teacher.tokenizer_json, teacher.special_tokens)
    except UnsupportedTokenizer as reason:
        return None, f"the teacher's tokenizer cannot be aligned byte for byte: {reason}"
    return TeacherText(table, chat), ""


class StudentTokenizers:
    """The serving process's side: sizes checked here, everything else in the two workers."""

    def __init__(self, teacher: TeacherVocabulary, limits: TokenizerLimits = TokenizerLimits()) -> None:
        self.limits = limits
        self.builds = Sandbox(
            "tokenizer-builds", limits.build, _setup_builds, (teacher, limits), max_waiting=limits.max_waiting_builds
        )
        self.encodes = Sandbox("tokenizer-encodes", limits.encode, max_waiting=256)

    def read(self, student: StudentTokenizerSpec) -> StudentReading:
        size = len(student.tokenizer_json)
        if size > self.limits.max_chars:
            raise InvalidArgument(
                f"tokenizer_json has {size} characters, over this teacher's limit of {self.limits.max_chars}"
            )
        try:
            return self.builds.call(read_student, student)
        except SandboxBusy as busy:
            raise ResourceExhausted(f"{busy}; open the session again shortly", retry_after_s=5.0) from None
        except SandboxFailure as failure:
            raise InvalidArgument(f"the student tokenizer was refused: {failure}") from None

    def attach(self, reading: StudentReading, text: TeacherText, tokenizer_json: str, key: str) -> PairTables:
        """The tables of a reading, with the teacher's side and an encoder running in the sandbox;
        `key`: the tokenizer's content hash (the encode worker caches tokenizers by it)."""
        return dataclasses.replace(
            reading.tables,
            teacher=text.table,
            teacher_trie=text.trie,
            encoder=SandboxedEncoder(self.encodes, tokenizer_json, key),
        )

    def close(self) -> None:
        self.builds.close()
        self.encodes.close()


@dataclass(eq=False)
class SandboxedEncoder:
    """text.PlainEncoder for a student's tokenizer, run by the encode worker; `key` names the
    tokenizer in the worker's cache (its content hash: the session's, computed once)."""

    sandbox: Sandbox
    tokenizer_json: str
    key: str
    refused: str = ""

    def __call__(self, texts: list[str]) -> tuple[list[list[int]], bool]:
        if self.refused:
            raise InvalidArgument(self.refused)
        try:
            answer = self.sandbox.call(encode_plain, self.key, None, texts)
            if answer is None:  # a new worker, or the tokenizer fell out of its cache
                answer = self.sandbox.call(encode_plain, self.key, self.tokenizer_json, texts)
        except SandboxBusy as busy:
            raise ResourceExhausted(f"{busy}; retry shortly", retry_after_s=1.0) from None
        except SandboxFailure as failure:
            self.refused = (
                f"the student's tokenizer failed while this session was scoring ({failure}); the session refuses "
                "further requests: use a tokenizer whose encoding is not this slow"
            )
            raise InvalidArgument(self.refused) from None
        return answer


# ------------------------------------------------------------------------------ in the workers

_teacher: TeacherVocabulary | None = None
_teacher_text: TeacherText | None = None
_teacher_error = ""
_limits = TokenizerLimits()
_encoders: OrderedDict[str, object] = OrderedDict()  # tokenizer hash -> plain tokenizer
ENCODERS_KEPT = 8


def _setup_builds(teacher: TeacherVocabulary, limits: TokenizerLimits) -> None:
    global _teacher, _teacher_text, _teacher_error, _limits
    _teacher, _limits = teacher, limits
    _teacher_text, _teacher_error = teacher_text_of(teacher)


def read_student(student: StudentTokenizerSpec) -> StudentReading:
    """Validate a student tokenizer and build its side of the alignment tables (in the worker)."""
    try:
        return _read_student(student)
    finally:
        parsed_tokenizer.cache_clear()  # its parse, shared by the checks and the probe: keep none of them


def _read_student(student: StudentTokenizerSpec) -> StudentReading:
    phase("parsing the student's tokenizer.json", _limits.parse_cpu_s)
    vocab = validated_vocab(student)
    vocab_size = max(vocab.values()) + 1
    if vocab == _teacher.vocab:
        return StudentReading(vocab_size, same_as_teacher=True)
    if _teacher_text is None:
        return StudentReading(vocab_size, unaligned=_teacher_error)
    phase("reading the bytes of the student's tokens", _limits.build.cpu_s)
    try:
        table = build_byte_table(student.tokenizer_json, student.special_tokens, check=False)
        phase("encoding a probe text with the student's tokenizer", _limits.probe_cpu_s)
        table = checked_table(table)  # the tokenizer parsed by validated_vocab: the probe alone is timed
        phase("building the alignment tables", _limits.build.cpu_s)
        tables = build_pair_tables(table, _teacher_text, trie_of(table))
    except UnsupportedTokenizer as reason:
        raise InvalidArgument(f"tokenizer_json cannot be used for cross-tokenizer scoring: {reason}") from None
    # The teacher's side stays out of the answer (the server has its own); so do the JSON and the
    # tokens and strings as Python objects (serving reads token bytes from the arrays).
    student_side = dataclasses.replace(
        tables,
        student=dataclasses.replace(table, tokenizer_json="", tokens=(), strings=(), ids=PackedVocab.of(table.ids)),
        teacher=None,
        teacher_trie=None,
        encoder=None,
    )
    return StudentReading(table.vocab_size, tables=student_side, nbytes=footprint(student_side))


def encode_plain(key: str, tokenizer_json: str | None, texts: list[str]) -> tuple[list[list[int]], bool] | None:
    """text.encoded_texts with the tokenizer of hash `key`; None if this worker does not have it
    and `tokenizer_json` is not sent along."""
    tokenizer = _encoders.get(key)
    if tokenizer is None:
        if tokenizer_json is None:
            return None
        tokenizer = _encoders[key] = plain_tokenizer(tokenizer_json)
        while len(_encoders) > ENCODERS_KEPT:
            _encoders.popitem(last=False)
    _encoders.move_to_end(key)
    return encoded_texts(tokenizer, texts)


def validated_vocab(student: StudentTokenizerSpec) -> dict[str, int]:
    """The student's vocabulary, or INVALID_ARGUMENT; sizes are read from the JSON before the
    tokenizers library builds anything (a vocabulary with one huge id would ask for gigabytes)."""
    try:
        spec = json.loads(student.tokenizer_json)
    except (ValueError, RecursionError) as error:
        raise InvalidArgument(f"tokenizer_json is not JSON: {str(error)[:200]}") from None
    _check_ids(*_declared_ids(spec))
    try:
        tokenizer = parsed_tokenizer(student.tokenizer_json)
    except Exception as error:
        raise InvalidArgument(
            f"tokenizer_json is not a valid Hugging Face tokenizer.json: {error}; "
            "send the text of the student's tokenizer.json (tokenizer.backend_tokenizer.to_str())"
        ) from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    _check_ids(len(vocab), max(vocab.values(), default=-1))
    missing = [token for token in (*student.special_tokens, *student.eos_tokens) if token not in vocab]
    if missing:
        raise InvalidArgument(f"special or eos tokens not in the tokenizer's vocabulary: {missing[:10]}")
    return vocab


def _declared_ids(spec) -> tuple[int, int]:
    """(tokens, largest id) as the JSON declares them; what is not there is left to the parser."""
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = (
        list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
    )
    added = spec.get("added_tokens") if isinstance(spec, dict) else None
    ids += [entry.get("id") for entry in added if isinstance(entry, dict)] if isinstance(added, list) else []
    ids = [index for index in ids if isinstance(index, int)]
    if vocab is None and not ids:
        return 1, 0  # no vocabulary where one is expected: the parser says what is wrong
    return len(ids), max(ids, default=-1)


def _check_ids(tokens: int, largest: int) -> None:
    if tokens == 0 or largest < 0:
        raise InvalidArgument("the student tokenizer's vocabulary is empty")
    if largest >= MAX_STUDENT_VOCAB:
        raise InvalidArgument(
            f"the student tokenizer's largest id is {largest} ({tokens} tokens), over this teacher's limit of "
            f"{MAX_STUDENT_VOCAB} ids (the session's tables are sized by the largest id)"
        )


def footprint(value, seen: set[int] | None = None) -> int:
    """Bytes a table object holds: numpy buffers, Python objects and what containers hold."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        return size + sum(footprint(key, seen) + footprint(item, seen) for key, item in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return size + sum(footprint(item, seen) for item in value)
    if dataclasses.is_dataclass(value):
        return size + sum(footprint(item, seen) for item in vars(value).values())
    return size
