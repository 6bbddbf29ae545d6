"""Everything built once per (student tokenizer, teacher tokenizer) pair, cached by content hash.

* the student's byte trie (where teacher bytes land in the student vocabulary);
* the ambiguous teacher paths: a teacher path p (a sequence of teacher tokens from
  a boundary) is ambiguous when it is a proper prefix of the teacher's own
  tokenization of some student token. The teacher writing p may be on its way to
  that longer student token (GPT-2's "130" is SmolLM2's "1", "3", "0"), so p
  cannot be projected yet: the projection follows it further. A path that is no
  such prefix projects onto the longest student token its bytes begin with: when
  the teacher ends a token where the student's vocabulary goes on (" egg" vs a
  student's " eggs"), the teacher's own tokenizer would have written the longer
  word differently, so the token boundary says the word stops there.

Paths are kept as 64-bit polynomial hashes of their token ids (path_hash), so
membership is one vectorised `isin`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.text import PlainEncoder, TeacherText, plain_encoder, plain_ids
from teacher_server.alignment.trie import ByteTrie, build_trie

HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
# Byte classes of the pre-tokenizers' words: letters (any non-ASCII byte with them), digits,
# whitespace, other. A word is a run of one class after at most one leading space.
LETTER, DIGIT, SPACE, OTHER = range(4)
BYTE_CLASS = np.full(256, OTHER, dtype=np.int8)
BYTE_CLASS[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1), *range(0x80, 0x100)]] = LETTER
BYTE_CLASS[ord("0") : ord("9") + 1] = DIGIT
BYTE_CLASS[[ord(c) for c in " \t\n\r\x0b\x0c"]] = SPACE
LONE_SPACE = 4  # a token that is one space: any word may follow it in the same piece
FIRST_AFTER_KEPT = 1 << 20  # first_after answers a session keeps (about 100 bytes each)


def path_hash(previous: np.ndarray, token: np.ndarray) -> np.ndarray:
    """Hash of a path extended by one token (previous = 0 for the empty path)."""
    with np.errstate(over="ignore"):
        return previous.astype(np.uint64) * HASH_BASE + (token.astype(np.uint64) + np.uint64(1))


@dataclass(frozen=True, eq=False)
class PairTables:
    student: ByteTable
    teacher: ByteTable
    trie: ByteTrie
    teacher_trie: ByteTrie  # to count the teacher tokens that begin with given bytes
    ambiguous: np.ndarray  # uint64, sorted hashes of ambiguous teacher paths
    # per student prefix: the longest student token that is a prefix of token t's
    # first d bytes (index trie.token_starts[t] + d)
    prefix_best: np.ndarray
    # per teacher token: the first token of the student's own tokenization of its bytes (-1 unknown)
    first_student: np.ndarray
    student_last_class: np.ndarray  # int8 per student token: BYTE_CLASS of its last byte, LONE_SPACE, -1 no bytes
    teacher_first_class: np.ndarray  # int8 per teacher token: BYTE_CLASS of its first byte, -1 no bytes or special
    encoder: PlainEncoder | None = None  # the student's tokenizer, as text that continues a text
    _first_after: dict = field(default_factory=dict, repr=False)  # (student, teacher) -> first_after

    def continues_word(self, student_ids: np.ndarray, teacher_ids: np.ndarray) -> np.ndarray:
        """Whether each teacher token, written right after the student token, may continue its last
        word (same byte class across the join, any word after a lone space, letters after a
        punctuation mark: Tekken's "/min"): only then can the student's tokenizer split the joined
        text differently from the student token alone (first_after decides)."""
        last, first = self.student_last_class[student_ids], self.teacher_first_class[teacher_ids]
        joins = (last == first) | (last == LONE_SPACE) | ((last == OTHER) & (first == LETTER))
        return (last >= 0) & (first >= 0) & joins

    def first_after(self, student_ids: np.ndarray, teacher_ids: np.ndarray) -> np.ndarray:
        """The first token of the student's encoding of a student token's bytes followed by a teacher
        token's, as the end of a word (cached per pair); -1 where unknown (first_tokens).

        The word is ended by a space (by a letter after whitespace): pre-tokenizers look ahead
        (GPT-2 writes "\n\n" as one token only where no word follows), and what the student's
        first token is does not depend on the next word."""
        keys = list(zip(student_ids.tolist(), teacher_ids.tolist()))
        unique = dict.fromkeys(keys)
        todo = [key for key in unique if key not in self._first_after]
        if todo:  # first_of_words answers -1 for all without an encoder
            if len(self._first_after) + len(todo) > FIRST_AFTER_KEPT:  # bounded: rollouts bring ever new pairs
                self._first_after.clear()
                todo = list(unique)
            joined = [self.student.token(s) + self.teacher.token(t) for s, t in todo]
            self._first_after.update(zip(todo, self.first_of_words(joined).tolist()))
        return np.asarray([self._first_after.get(key, -1) for key in keys], dtype=np.int64)

    def first_of_words(self, texts: list[bytes]) -> np.ndarray:
        """The first token of the student's encoding of each text as the end of a word (first_after);
        -1 where unknown, or where that token is longer than the text (it needs what follows)."""
        if self.encoder is None:
            return np.full(len(texts), -1, dtype=np.int64)
        ended = [text + (b"a" if BYTE_CLASS[text[-1]] == SPACE else b" ") for text in texts]
        first = first_tokens(self.student, self.trie, self.encoder, ended)
        unspelt = np.flatnonzero(first < 0)  # a vocabulary without the end mark (the demo's digits)
        if len(unspelt):
            first[unspelt] = first_tokens(self.student, self.trie, self.encoder, [texts[i] for i in unspelt])
        inside = (first >= 0) & (self.student.lengths[first] <= np.asarray([len(text) for text in texts]))
        return np.where(inside, first, -1)

    def is_ambiguous(self, hashes: np.ndarray) -> np.ndarray:
        if len(self.ambiguous) == 0:
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(self.ambiguous, hashes), len(self.ambiguous) - 1)
        return self.ambiguous[at] == hashes


def build_pair_tables(student: ByteTable, text: TeacherText, trie: ByteTrie) -> PairTables:
    # Teacher tokenization of every student token that is valid UTF-8 on its own
    # (a fragment of a character cannot start a longer teacher path anyway).
    strings, owners = [], []
    for index, token in enumerate(student.tokens):
        if len(token) > 1 and student.preferred[index]:
            try:
                strings.append(token.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            owners.append(index)
    # None: the teacher cannot write that token's text at all, so no teacher path leads to it.
    encodings = text.plain_ids(strings) if strings else []
    hashes: list[int] = []
    base, mask = int(HASH_BASE), (1 << 64) - 1
    for ids in encodings:  # path_hash in plain integers (same values, no numpy per token)
        if ids is None:
            continue
        running = 0
        for token in ids[:-1]:
            running = (running * base + token + 1) & mask
            hashes.append(running)
    ambiguous = np.unique(np.asarray(hashes, dtype=np.uint64)) if hashes else np.zeros(0, dtype=np.uint64)

    # Longest student token along each student token's own prefixes.
    nodes = trie.prefix_nodes
    here = trie.token_at[nodes]
    best = np.where(here >= 0, here, -1)
    # Running maximum within each token's segment: depth grows along the segment,
    # so the last hit so far is the longest.
    index = np.where(here >= 0, np.arange(len(nodes)), -1)
    segment_start = np.repeat(trie.token_starts[:-1], np.diff(trie.token_starts))
    index = np.maximum.accumulate(np.maximum(index, segment_start - 1))
    valid = index >= segment_start
    prefix_best = np.where(valid, best[np.maximum(index, 0)], -1)
    encoder = plain_encoder(student.tokenizer_json) if student.tokenizer_json else None
    return PairTables(
        student=student,
        teacher=text.table,
        trie=trie,
        teacher_trie=text.trie,
        ambiguous=ambiguous,
        prefix_best=prefix_best,
        first_student=first_student_tokens(student, trie, text.table, encoder),
        student_last_class=_edge_classes(student, -1, lone_space=True),
        teacher_first_class=_edge_classes(text.table, 0, lone_space=False),
        encoder=encoder,
    )


def _edge_classes(table: ByteTable, at: int, lone_space: bool) -> np.ndarray:
    """BYTE_CLASS of each token's byte at `at` (0 first, -1 last); -1 for specials and empty tokens."""
    edge = np.asarray([token[at] if token else 0 for token in table.tokens], dtype=np.int64)
    classes = np.where((table.lengths > 0) & ~table.special, BYTE_CLASS[edge], -1).astype(np.int8)
    if lone_space:
        classes[[index for index, token in enumerate(table.tokens) if token == b" "]] = LONE_SPACE
    return classes


def first_student_tokens(student: ByteTable, trie: ByteTrie, teacher: ByteTable, encoder) -> np.ndarray:
    """For every teacher token, the first token of the student tokenizer's own encoding of its bytes
    (first_tokens); -1 for specials and tokens without bytes, or without an encoder.

    BPE does not take the longest match: SentencePiece writes " bolts" as " bol", "ts" although
    " bolt" is a token, and pre-tokenizers cut before digits or runs of spaces. A teacher token
    that leaves the rollout's text lands where the student's tokenizer would start, not on the
    longest student token its bytes begin with.
    """
    first = np.full(teacher.vocab_size, -1, dtype=np.int64)
    if encoder is None:
        return first
    owners = [index for index, token in enumerate(teacher.tokens) if token and not teacher.special[index]]
    first[owners] = first_tokens(student, trie, encoder, [teacher.tokens[i] for i in owners])
    return first


def first_tokens(student: ByteTable, trie: ByteTrie, encoder: PlainEncoder, texts: list[bytes]) -> np.ndarray:
    """The first token of each text's encoding by `encoder` (the student's plain tokenizer:
    as text that continues a text, no dummy prefix), as the preferred id of its bytes; -1 where the
    bytes are not UTF-8 text or the tokens do not give them back (a normalizer rewrote them, an
    unknown token)."""
    first = np.full(len(texts), -1, dtype=np.int64)
    decoded, owners = [], []
    for index, raw in enumerate(texts):
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        owners.append(index)
    lengths = student.lengths.tolist()
    known, leading = [], []
    for index, ids in zip(owners, plain_ids(encoder, student, decoded) if decoded else []):
        raw = texts[index]
        if ids and raw.startswith(student.token(ids[0])) and sum(lengths[i] for i in ids) == len(raw):
            known.append(index)
            leading.append(ids[0])
    if known:
        leading = np.asarray(leading, dtype=np.int64)
        first[known] = trie.token_at[trie.prefix_nodes[trie.token_starts[leading] + student.lengths[leading]]]
    return first


# Weak values, as byte_tables._cache: tables live as long as a session uses them.
_tries: weakref.WeakValueDictionary[str, ByteTrie] = weakref.WeakValueDictionary()
_pairs: weakref.WeakValueDictionary[tuple[str, str], PairTables] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def trie_of(table: ByteTable) -> ByteTrie:
    """The cached trie of a vocabulary (one per content hash)."""
    with _lock:
        trie = _tries.get(table.content_hash)
    if trie is None:
        trie = build_trie(table)
        with _lock:
            trie = _tries.setdefault(table.content_hash, trie)
    return trie


def pair_tables(student: ByteTable, text: TeacherText) -> PairTables:
    """The cached tables of this pair (built on first use, then shared by every session)."""
    key = (student.content_hash, text.table.content_hash)
    with _lock:
        cached = _pairs.get(key)
    if cached is not None:
        return cached
    built = build_pair_tables(student, text, trie_of(student))
    with _lock:
        return _pairs.setdefault(key, built)
