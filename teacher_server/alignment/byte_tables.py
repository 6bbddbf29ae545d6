"""Byte tables: the exact bytes of every token of a Hugging Face fast tokenizer.

Alignment works on bytes, never characters: byte-level BPE splits one multi-byte
character over several tokens. A table is read from the tokenizer.json text alone:

* byte-level BPE (GPT-2, Llama-3, Qwen, tiktoken-derived vocabularies such as
  Tekken): every character of a token string stands for one byte through GPT-2's
  bytes_to_unicode map;
* SentencePiece (Metaspace, "\u2581" for a space; `<0xNN>` byte-fallback pieces
  are that one byte);
* plain vocabularies whose strings are their own UTF-8 text: BPE/Unigram without a
  byte-level or Metaspace mapping, and WordLevel vocabularies whose decoder is Fuse
  (the text is the token strings back to back, e.g. one token per character).

Added tokens are their literal content; special (control) tokens and the unknown
token carry no bytes and are flagged. WordPiece vocabularies ("##" continuations) and
WordLevel ones without a Fuse decoder (decoded with spaces between the words) drop
or invent whitespace, so their text cannot be rebuilt from the tokens: they are refused.
Tables are cached by the content hash of the tokenizer.json text (plus the extra
special tokens), so every session with the same tokenizer shares one table.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping

import numpy as np

from teacher_server.alignment.specials import SpecialVocab

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# A text that exercises the decoding rules (spaces, runs of whitespace, newlines, digits).
PROBE = "Hello, world! 123 4567\n\n  indented\ttab x=y+1; end."
# A vocabulary that cannot spell PROBE is probed with up to this many of its own tokens, and
# at most PROBE_CHARS characters in all: the probe's cost must not grow with the tenant's tokens.
PROBE_TOKENS = 64
PROBE_CHARS = 512


class UnsupportedTokenizer(ValueError):
    """A tokenizer whose tokens cannot be read back as exact bytes."""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (printable characters stand for bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


@dataclass(frozen=True, eq=False)
class ByteTable:
    """Bytes of every token id; token i is data[starts[i]:starts[i + 1]]."""

    content_hash: str
    kind: str  # "byte-level" | "metaspace" | "plain"
    data: np.ndarray  # uint8, all tokens' bytes back to back
    starts: np.ndarray  # int64 [V + 1]
    special: np.ndarray  # bool [V]: control/unknown tokens and holes in the id range (no bytes)
    preferred: np.ndarray  # bool [V]: the id to project onto among tokens with equal bytes
    # The same bytes and strings as Python objects, for building tables; empty in a student's table
    # as the server keeps it (student_tokenizer.py): 150k small objects fragment the serving heap.
    tokens: tuple[bytes, ...]
    strings: tuple[str | None, ...]  # vocabulary string of every id (None for holes)
    # vocabulary string -> id, added tokens included (a student's table: packed_vocab.PackedVocab)
    ids: Mapping[str, int]
    specials: dict[str, int]  # its special (control) tokens by string
    dummy_prefix: bool  # the tokenizer puts a space before the text it encodes
    padded: np.ndarray  # uint16 [V, WINDOW]: first bytes of each token, padded with PAD_UNIT
    tokenizer_json: str = field(default="", repr=False)  # the source, for encoding text with this tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.starts) - 1

    @property
    def special_vocab(self) -> SpecialVocab:
        return SpecialVocab(self.ids, self.specials)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def token(self, index: int) -> bytes:
        """The bytes of token `index` (from data: `tokens` may be left out)."""
        return self.data[self.starts[index] : self.starts[index + 1]].tobytes()

    def token_bytes(self, ids: np.ndarray) -> bytes:
        """The bytes of `ids` back to back (gathered in one numpy pass)."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = self.starts[ids]
        lengths = self.starts[ids + 1] - starts
        ends = np.cumsum(lengths)
        return self.data[
            np.repeat(starts - ends + lengths, lengths) + np.arange(ends[-1] if len(ends) else 0)
        ].tobytes()


WINDOW = 16  # bytes compared at once in the vectorised prefix tests
PAD_UNIT = 0xFFFE  # never equal to a byte (0..255), a special unit (256..) or the stream's end marker


def _components(node) -> list[dict]:
    """Every typed component of a normalizer/pre_tokenizer/decoder tree."""
    if isinstance(node, dict):
        found = [node] if "type" in node else []
        for value in node.values():
            found += _components(value)
        return found
    if isinstance(node, list):
        return [item for value in node for item in _components(value)]
    return []


def _kind(spec: dict) -> tuple[str, str]:
    model = spec.get("model") or {}
    model_type = model.get("type")
    supported = "cross-tokenizer scoring needs a byte-level BPE, SentencePiece/Metaspace, plain BPE/Unigram or WordLevel+Fuse tokenizer"
    if model_type == "WordPiece":
        raise UnsupportedTokenizer(
            f"WordPiece tokenizers drop whitespace, so their text cannot be rebuilt byte for byte; {supported}"
        )
    if model_type not in ("BPE", "Unigram", "WordLevel"):
        raise UnsupportedTokenizer(f"unknown tokenizer model type {model_type!r}")
    decoder = {part["type"] for part in _components(spec.get("decoder"))}
    if model_type == "WordLevel" and ("Fuse" not in decoder or decoder - {"Fuse", "Sequence"}):
        # Without Fuse, decoding puts a space between the words: the text is not the tokens' bytes.
        raise UnsupportedTokenizer(
            f"WordLevel tokenizers are aligned only with a Fuse decoder (the text is the tokens back to back), "
            f"this one decodes with {sorted(decoder) or 'spaces between the words'}; {supported}"
        )
    parts = (
        _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    )
    types = {part["type"] for part in parts}
    dropping = types & {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
    if dropping:
        raise UnsupportedTokenizer(
            f"pre-tokenizer {sorted(dropping)} drops whitespace; the text cannot be rebuilt from tokens"
        )
    if "ByteLevel" in types:
        return "byte-level", ""
    for part in parts:
        if part["type"] == "Metaspace":
            return "metaspace", part.get("replacement", "\u2581")
        if part["type"] == "Replace" and part.get("content") == " " and part.get("pattern", {}).get("String"):
            return "metaspace", part["pattern"]["String"]
    return "plain", ""


def _vocabulary(spec: dict) -> dict[str, int]:
    model = spec["model"]
    if model["type"] == "Unigram":
        vocab = {piece: index for index, (piece, _score) in enumerate(model["vocab"])}
    else:
        vocab = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def build_byte_table(tokenizer_json: str, extra_special: Iterable[str] = (), check: bool = True) -> ByteTable:
    """Read the byte table of a tokenizer.json text; UnsupportedTokenizer if it has none.
    check=False leaves out the probe (checked_table), for a caller that limits it on its own."""
    try:
        spec = json.loads(tokenizer_json)
    except ValueError as error:
        raise UnsupportedTokenizer(f"not JSON: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UnsupportedTokenizer("no tokenizer model in the JSON")
    extra_special = tuple(sorted(set(extra_special)))
    kind, space = _kind(spec)  # first: it refuses the tokenizers that cannot be aligned, with the reason
    vocab = _vocabulary(spec)
    strings: list[str | None] = [None] * (max(vocab.values()) + 1)
    for string, index in vocab.items():
        strings[index] = string
    tokens, special, fallback = _token_bytes(spec, kind, space, strings, _special_ids(spec, vocab, extra_special))
    lengths = np.fromiter((len(token) for token in tokens), dtype=np.int64, count=len(tokens))
    starts = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    data = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    columns = np.arange(WINDOW)
    inside = columns < lengths[:, None]
    source = np.minimum(starts[:-1, None] + columns, max(len(data) - 1, 0))
    padded = np.where(inside, data[source] if len(data) else 0, PAD_UNIT).astype(np.uint16)
    table = ByteTable(
        content_hash=content_hash(tokenizer_json, extra_special),
        kind=kind,
        data=data,
        starts=starts,
        special=special,
        preferred=_preferred(tokens, special, fallback),
        tokens=tuple(tokens),
        strings=tuple(strings),
        ids=vocab,
        specials={string: index for string, index in vocab.items() if special[index]},
        dummy_prefix=False,
        padded=padded,
        tokenizer_json=tokenizer_json,
    )
    return checked_table(table) if check else table


def _special_ids(spec: dict, vocab: dict[str, int], extra_special: Iterable[str]) -> set[int]:
    """Control tokens: added tokens marked special, the extra ones named, and the unknown token."""
    model = spec["model"]
    special_ids = {entry["id"] for entry in spec.get("added_tokens") or [] if entry.get("special")}
    special_ids |= {vocab[token] for token in extra_special if token in vocab}
    unknown = model.get("unk_id") if model["type"] == "Unigram" else vocab.get(model.get("unk_token") or "")
    if unknown is not None:
        special_ids.add(unknown)
    return special_ids


def _token_bytes(
    spec: dict, kind: str, space: str, strings: list[str | None], special_ids: set[int]
) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The bytes of every id, which ids are special (no bytes), which are <0xNN> byte fallbacks."""
    added = {entry["id"] for entry in spec.get("added_tokens") or []}
    byte_fallback = bool(spec["model"].get("byte_fallback"))
    to_byte = _unicode_to_byte()
    tokens: list[bytes] = []
    special = np.zeros(len(strings), dtype=bool)
    fallback = np.zeros(len(strings), dtype=bool)
    for index, string in enumerate(strings):
        if string is None or index in special_ids:
            special[index] = True
            tokens.append(b"")
            continue
        if index in added:  # added tokens match (and decode to) their literal content
            tokens.append(string.encode("utf-8"))
        elif kind == "byte-level":
            try:
                tokens.append(bytes(to_byte[char] for char in string))
            except KeyError:
                tokens.append(string.encode("utf-8"))
        elif kind == "metaspace" and byte_fallback and (match := BYTE_FALLBACK.match(string)):
            tokens.append(bytes([int(match.group(1), 16)]))
            fallback[index] = True
        elif kind == "metaspace":
            tokens.append(string.replace(space, " ").encode("utf-8"))
        else:
            tokens.append(string.encode("utf-8"))
        if not tokens[-1]:
            special[index] = True  # an empty token has nothing to align
    return tokens, special, fallback


def _preferred(tokens: list[bytes], special: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Among tokens with the same bytes, the one to project onto: the one the tokenizer produces,
    a regular piece rather than its <0xNN> byte-fallback twin, else the lowest id."""
    preferred = ~special
    first: dict[bytes, int] = {}
    for index in np.argsort(fallback, kind="stable").tolist():
        if special[index]:
            continue
        if tokens[index] in first:
            preferred[index] = False
        else:
            first[tokens[index]] = index
    return preferred


def probe_text(table: ByteTable) -> str:
    """PROBE if the vocabulary can spell it, else what it can spell of PROBE and then its own tokens.

    A small vocabulary (the digits of a synthetic task) cannot encode PROBE at all: a WordLevel
    model without an unknown token raises, a BPE drops the characters it lacks. Its text can
    only ever be made of its tokens, so those (one after another, up to PROBE_TOKENS of them,
    spread over the ids, PROBE_CHARS characters in all) are what must come back.
    """
    spelled = {byte for token, special in zip(table.tokens, table.special.tolist()) if not special for byte in token}
    if set(PROBE.encode()) <= spelled:
        return PROBE
    own = np.flatnonzero(table.preferred).tolist()
    own = own[:: max(1, len(own) // PROBE_TOKENS)][:PROBE_TOKENS]
    texts = []
    for index in own:
        try:
            texts.append(table.tokens[index].decode("utf-8"))
        except UnicodeDecodeError:  # a fragment of a character: it only comes with the rest
            continue
    return ("".join(char for char in PROBE if set(char.encode()) <= spelled) + "".join(texts))[:PROBE_CHARS]


def checked_table(table: ByteTable) -> ByteTable:
    """Encode a probe text and require the table to give it back (learning the dummy prefix)."""
    try:
        tokenizer = parsed_tokenizer(table.tokenizer_json)
    except Exception as error:
        raise UnsupportedTokenizer(f"tokenizers cannot load it: {error}") from None
    probe = probe_text(table)
    try:
        ids = tokenizer.encode(probe, add_special_tokens=False).ids
    except Exception as error:  # e.g. WordLevel without an unknown token, on a word it lacks
        raise UnsupportedTokenizer(f"it cannot encode text made of its own tokens ({probe[:40]!r}): {error}") from None
    rebuilt = table.token_bytes(ids)
    text = probe.encode()
    if rebuilt == text:
        return table
    if rebuilt == b" " + text:
        return _replace(table, dummy_prefix=True)
    raise UnsupportedTokenizer(
        f"its tokens do not give back the text they encode ({text[:40]!r} came back as {rebuilt[:40]!r}); "
        "a normalizer that rewrites text (lower-casing, NFKC, stripping) cannot be aligned byte for byte"
    )


def _replace(table: ByteTable, **changes) -> ByteTable:
    fields = dict(table.__dict__)
    fields.update(changes)
    return ByteTable(**fields)


def content_hash(tokenizer_json: str, extra_special: Iterable[str] = ()) -> str:
    digest = hashlib.sha256(tokenizer_json.encode())
    digest.update(json.dumps(sorted(set(extra_special))).encode())
    return digest.hexdigest()


@lru_cache(maxsize=8)
def parsed_tokenizer(tokenizer_json: str):
    """tokenizers.Tokenizer.from_str, once per text (a 131k-token vocabulary takes a second)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


# Weak values: a table lives as long as a session uses it, so sessions opened and closed with
# ever new tokenizers do not grow the server (a reopened tokenizer is built again).
_cache: weakref.WeakValueDictionary[str, ByteTable] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def byte_table(tokenizer_json: str, extra_special: Iterable[str] = ()) -> ByteTable:
    """The cached table of this tokenizer (one per content hash, shared by all sessions)."""
    key = content_hash(tokenizer_json, extra_special)
    with _lock:
        cached = _cache.get(key)
    if cached is None:
        cached = build_byte_table(tokenizer_json, extra_special)
        with _lock:
            cached = _cache.setdefault(key, cached)
    return cached
