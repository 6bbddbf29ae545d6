"""The teacher's side of the text: bytes in, teacher token ids out, and its chat template.

The student's completion arrives as bytes. The teacher tokenizes them as it would
have written them: no dummy-prefix space (the completion continues a prompt), and
special-token strings inside the text stay plain text (a student writing
"<|im_end|>" as characters did not emit the control token). Invalid UTF-8 (a
byte-level student can sample half a character) is encoded byte by byte.
Every encoding is checked: `encode` reports how many leading bytes its tokens
give back exactly, and the caller marks whatever lies beyond as unaligned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Callable

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.fast_bpe import TiktokenTwin, tiktoken_twin
from teacher_server.alignment.trie import ByteTrie, build_trie

if TYPE_CHECKING:
    from teacher_server.alignment.chat import TeacherChat

# How surrogateescape decoding shows a byte that is not valid UTF-8 (U+DC80..U+DCFF).
INVALID_BYTE = re.compile("[\udc80-\udcff]")


def without_dummy_prefix(spec: dict) -> dict:
    """The same tokenizer, except that it never adds a space at the start of a text."""

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                if "add_prefix_space" in node:
                    node["add_prefix_space"] = False
            if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
                node["add_prefix_space"] = False
            for key, value in list(node.items()):
                if isinstance(value, list):
                    node[key] = [visit(item) for item in value if not _is_prepend(item)]
                else:
                    node[key] = visit(value)
        return node

    spec = visit(spec)
    if _is_prepend(spec.get("normalizer")):
        spec["normalizer"] = None
    return spec


def plain_tokenizer(tokenizer_json: str):
    """The tokenizer of `tokenizer_json` as an encoder of text that continues a text (no dummy prefix)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(without_dummy_prefix(json.loads(tokenizer_json))))


def encodable_prefix(tokenizer, text: str) -> list[int]:
    """Ids of the pre-tokenized pieces of `text` up to the first one the model cannot encode.

    The model encodes each pre-token on its own, so these are the ids of that prefix; callers
    see that they stop short of the text and treat the rest as unencodable.
    """
    splitter = tokenizer.pre_tokenizer
    pieces = [piece for piece, _ in splitter.pre_tokenize_str(text)] if splitter is not None else [text]
    ids: list[int] = []
    for piece in pieces:
        try:
            ids += tokenizer.encode(piece, add_special_tokens=False).ids
        except Exception:
            break
    return ids


# Encodes texts with a plain tokenizer: (each text's ids, whether every text was encoded whole;
# if not, each entry is the ids of the text's encodable prefix). `encoded_texts` over a tokenizer
# in this process; a student's tokenizer is run in the sandbox instead (student_tokenizer.py).
PlainEncoder = Callable[[list[str]], tuple[list[list[int]], bool]]


def encoded_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], bool]:
    """A PlainEncoder's answer for `tokenizer` (a plain_tokenizer)."""
    try:
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)], True
    except Exception:  # one text outside a WordLevel vocabulary fails the whole batch: one by one
        return [encodable_prefix(tokenizer, text) for text in texts], False


def plain_encoder(tokenizer_json: str) -> PlainEncoder:
    """A PlainEncoder running `tokenizer_json`'s plain_tokenizer in this process."""
    return partial(encoded_texts, plain_tokenizer(tokenizer_json))


def plain_ids(encoder: PlainEncoder, table: ByteTable, texts: list[str]) -> list[list[int] | None]:
    """Each text's tokens with a plain encoder; None where it cannot encode all of it."""
    encodings, whole = encoder(texts)
    if whole:
        return encodings
    return [ids if table.token_bytes(ids) == text.encode() else None for ids, text in zip(encodings, texts)]


def _is_prepend(node) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend"


@dataclass(eq=False)
class TeacherText:
    """Encodes bytes with the teacher's tokenizer; `chat` renders its chat template (chat.py)."""

    table: ByteTable
    chat: TeacherChat
    _plain: object = field(default=None, repr=False)
    _default: object = field(default=None, repr=False)
    _single_byte: dict[int, int] = field(default_factory=dict, repr=False)
    _twin: TiktokenTwin | None = field(default=None, repr=False)
    # The teacher's trie (to count the teacher tokens that begin with given bytes): built with the
    # text, held as long as it is, whatever sessions come and go.
    trie: ByteTrie = field(init=False, repr=False)

    def __post_init__(self) -> None:
        spec = without_dummy_prefix(json.loads(self.chat.tokenizer_json))
        self._default, self._plain = self.chat.default, self.chat.plain
        # One character the vocabulary spells ("a" is not in a digits-only vocabulary) shows what
        # the post-processor adds around a text.
        sample = next(
            (t.decode() for t, p in zip(self.table.tokens, self.table.preferred.tolist()) if p and len(t) == 1), "a"
        )
        with_special = self._default.encode(sample, add_special_tokens=True).ids
        without = self._default.encode(sample, add_special_tokens=False).ids
        cut = len(with_special) - len(without)
        self._start_ids = np.asarray(with_special[:cut] if with_special[cut:] == without else [], dtype=np.int64)
        self._twin = tiktoken_twin(spec, self._plain, self.table)
        self.trie = build_trie(self.table)
        for index, token in enumerate(self.table.tokens):
            if len(token) == 1 and self.table.preferred[index]:
                self._single_byte.setdefault(token[0], index)
        # Without a pre-tokenizer that splits (SentencePiece/Metaspace), BPE runs over the whole
        # text at once, which gets slow on long texts. A byte that no longer token contains
        # (a newline for SentencePiece vocabularies) is a token boundary whatever surrounds it:
        # cutting the text there gives the same tokens, in pieces that encode fast.
        self._separators = ""
        if self.table.kind == "metaspace":
            inside = set()
            for token in self.table.tokens:
                if len(token) > 1:
                    inside.update(token)
            self._separators = "".join(chr(b) for b in (10, 13, 9) if b not in inside and b in self._single_byte)

    @property
    def encoder(self) -> str:
        """What re-tokenizes completions: "tiktoken" (the twin of fast_bpe.py) or "tokenizers"."""
        return "tiktoken" if self._twin is not None else "tokenizers"

    def _encode_text(self, text: str, use_twin: bool) -> list[int]:
        if use_twin:
            return self._twin.encode(text)
        try:
            if not self._separators or len(text) < 256:
                return self._plain.encode(text, add_special_tokens=False).ids
            pieces = [piece for piece in re.split(f"([{re.escape(self._separators)}])", text) if piece]
            # encode_batch_fast: no offsets, which this does not read (a third faster)
            return list(
                chain.from_iterable(
                    encoding.ids for encoding in self._plain.encode_batch_fast(pieces, add_special_tokens=False)
                )
            )
        except Exception:  # a WordLevel vocabulary without an unknown token refuses a word it lacks
            return encodable_prefix(self._plain, text)

    def plain_ids(self, texts: list[str]) -> list[list[int] | None]:
        """The teacher's tokens of each text (no dummy prefix); None where it cannot encode all of it."""
        return plain_ids(partial(encoded_texts, self._plain), self.table, texts)

    def encode(self, data: bytes) -> tuple[np.ndarray, int]:
        """Teacher ids for `data` and how many leading bytes they reproduce exactly."""
        text = data.decode("utf-8", errors="surrogateescape")
        use_twin = self._twin is not None and self._twin.covers(data)
        ids: list[int] = []
        run_start = 0
        for invalid in INVALID_BYTE.finditer(text):  # an invalid byte: its own single-byte token
            index = invalid.start()
            ids += self._encode_text(text[run_start:index], use_twin) if index > run_start else []
            byte_id = self._single_byte.get(ord(text[index]) - 0xDC00)
            if byte_id is None:
                run_start = len(text) + 1
                break
            ids.append(byte_id)
            run_start = index + 1
        if run_start < len(text):
            ids += self._encode_text(text[run_start:], use_twin)
        array = np.asarray(ids, dtype=np.int64)
        return array, _common_prefix(self.table.token_bytes(array), data)

    def start_ids(self) -> np.ndarray:
        """What the teacher's post-processor puts before a text (e.g. BOS)."""
        return self._start_ids


def _common_prefix(left: bytes, right: bytes) -> int:
    if left == right:
        return len(left)
    size = min(len(left), len(right))
    a = np.frombuffer(left[:size], dtype=np.uint8)
    b = np.frombuffer(right[:size], dtype=np.uint8)
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if len(differ) else size
