"""A tiktoken twin of a byte-level BPE teacher tokenizer: the same ids, several times faster.

Cross-tokenizer scoring re-tokenizes every student completion with the teacher's
tokenizer, and for byte-level BPE (GPT-2, SmolLM2, Llama-3, Tekken style) Hugging
Face `tokenizers` spends most of that time in its pre-tokenizing regex and in
building offsets nobody reads here. tiktoken runs the same algorithm (regex split,
then byte-pair merges by rank) about 10x faster on one core (bench/alignment.py).

The twin uses the token ids as merge ranks. That is the tokenizer's own merge order
only when the merges' results come in increasing id order (true of tokenizers trained
by `tokenizers` and of tiktoken-derived ones), which is checked. tiktoken also merges
any two adjacent tokens whose concatenation is in the vocabulary, where `tokenizers`
merges only listed pairs; no finite check proves that this never matters, so a twin
is used only after it encodes every vocabulary token, taken as one pre-token, exactly
as the tokenizer does, and a probe text too; otherwise (or for any other tokenizer
shape) there is no twin and the Hugging Face tokenizer is used.
tests/teacher_server/alignment/test_fast_bpe.py compares the twins of the real
tokenizers with Hugging Face on GSM8K and on random Unicode text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable

log = logging.getLogger(__name__)

# The pre-tokenizer regex of ByteLevel(use_regex=True) in `tokenizers` (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE = "Hello, world! 123 4567\n\n  indented\ttab x=y+1; end. Ünïcödé 数学 🙂 don't   \r\n"


@dataclass(frozen=True, eq=False)
class TiktokenTwin:
    encoding: object  # tiktoken.Encoding
    # bool [256]: bytes that are tokens of their own. A vocabulary may lack some (SmolLM2 has
    # no token for most ASCII control bytes); tiktoken cannot start from a byte it lacks, so a
    # text with one is left to the Hugging Face tokenizer.
    spelled: np.ndarray

    def covers(self, data: bytes) -> bool:
        return bool(self.spelled[np.frombuffer(data, dtype=np.uint8)].all())

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)


def tiktoken_twin(spec: dict, backend, table: ByteTable) -> TiktokenTwin | None:
    """A tiktoken encoder that gives `backend`'s ids for the texts it covers, or None.

    `spec` is the parsed tokenizer.json of `backend` (a `tokenizers.Tokenizer` that adds no
    dummy prefix and reads special-token strings as plain text); `table` is its byte table.
    """
    pattern = _split_pattern(spec)
    model = spec.get("model") or {}
    if (
        table.kind != "byte-level"
        or pattern is None
        or spec.get("normalizer") is not None
        or model.get("type") != "BPE"
    ):
        return None
    if (
        model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("byte_fallback")
    ):
        return None
    if any(not token.get("special") for token in spec.get("added_tokens") or []):
        return None  # plain added tokens are matched before the regex: tiktoken has no such step
    try:
        import tiktoken
    except ImportError:
        return None
    plain = np.flatnonzero(~table.special).tolist()  # specials carry no bytes and are no ranks
    ranks = {table.tokens[index]: index for index in plain}
    if len(ranks) != len(plain) or not _merges_follow_ids(model):
        return None  # two ids with the same bytes: no rank order can stand for both
    spelled = np.asarray([bytes([b]) in ranks for b in range(256)])
    try:
        twin = tiktoken.Encoding("opd-teacher-twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as error:  # a pattern tiktoken's regex engine does not accept
        log.info("no tiktoken twin for the teacher tokenizer: %s", error)
        return None
    if not _same_encodings(twin, backend, table, plain):
        log.info("no tiktoken twin for the teacher tokenizer: its merges do not follow its ids")
        return None
    return TiktokenTwin(twin, spelled)


def _split_pattern(spec: dict) -> str | None:
    """The regex that splits text into pre-tokens, if the pre-tokenizer is a byte-level one."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) else None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or regex is None
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
    ):
        return None
    return regex


def _merges_follow_ids(model: dict) -> bool:
    """Each merge's result has an id no smaller than the results of the merges before it."""
    vocab, previous = model["vocab"], -1
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if result is None or result < previous:
            return False
        previous = result
    return True


def _same_encodings(twin, backend, table: ByteTable, plain: list[int]) -> bool:
    """Both encode every vocabulary token (as one pre-token) and PROBE the same way."""
    single_piece = getattr(twin, "_encode_single_piece", None)
    if single_piece is None:
        return False
    try:
        for index in plain:
            if len(table.tokens[index]) > 1:
                # Byte-pair merges of the token's bytes, as one pre-token, must agree.
                pieces = backend.model.tokenize(table.strings[index])
                if single_piece(table.tokens[index]) != [piece.id for piece in pieces]:
                    return False
        return twin.encode_ordinary(PROBE) == backend.encode(PROBE, add_special_tokens=False).ids
    except BaseException as error:  # tiktoken panics (PanicException) on a byte it has no rank for
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return False
