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
from dataclasses import dataclass

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.text import TeacherText, plain_ids, plain_tokenizer
from teacher_server.alignment.trie import ByteTrie, build_trie

HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


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

    def is_ambiguous(self, hashes: np.ndarray) -> np.ndarray:
        if len(self.ambiguous) == 0:
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(self.ambiguous, hashes), len(self.ambiguous) - 1)
        return self.ambiguous[at] == hashes


def build_pair_tables(student: ByteTable, text: TeacherText, trie: ByteTrie, teacher_trie: ByteTrie) -> PairTables:
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
    return PairTables(
        student=student,
        teacher=text.table,
        trie=trie,
        teacher_trie=teacher_trie,
        ambiguous=ambiguous,
        prefix_best=prefix_best,
        first_student=first_student_tokens(student, trie, text.table),
    )


def first_student_tokens(student: ByteTable, trie: ByteTrie, teacher: ByteTable) -> np.ndarray:
    """For every teacher token, the first token of the student tokenizer's own encoding of its bytes
    (as text that continues a text: no dummy prefix), as the preferred id of those bytes; -1 where
    the bytes are not text, the student's tokens do not give them back, or the table has no tokenizer.

    BPE does not take the longest match: SentencePiece writes " bolts" as " bol", "ts" although
    " bolt" is a token, and pre-tokenizers cut before digits or runs of spaces. A teacher token
    that leaves the rollout's text lands where the student's tokenizer would start, not on the
    longest student token its bytes begin with.
    """
    first = np.full(teacher.vocab_size, -1, dtype=np.int64)
    if not student.tokenizer_json:
        return first
    texts, owners = [], []
    for index, token in enumerate(teacher.tokens):
        if token and not teacher.special[index]:
            try:
                texts.append(token.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            owners.append(index)
    encodings = plain_ids(plain_tokenizer(student.tokenizer_json), student, texts)
    tokens, lengths = student.tokens, student.lengths.tolist()
    known, leading = [], []
    for index, ids in zip(owners, encodings):
        raw = teacher.tokens[index]
        # Tokens that give the text back exactly (no normalizer rewrote it, no unknown token).
        if ids and raw.startswith(tokens[ids[0]]) and sum(lengths[i] for i in ids) == len(raw):
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
    built = build_pair_tables(student, text, trie_of(student), trie_of(text.table))
    with _lock:
        return _pairs.setdefault(key, built)
