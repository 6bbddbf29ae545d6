"""The tiktoken twin of a byte-level BPE teacher gives the Hugging Face tokenizer's ids."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from teacher_server.alignment.byte_tables import build_byte_table, byte_table
from teacher_server.alignment.fast_bpe import tiktoken_twin
from teacher_server.alignment.text import without_dummy_prefix
from testkit import tokenizers as T
from tests.helpers import PIECES

BYTE_LEVEL = ("tekken", "gpt2", "smollm2")
# Random Unicode (any code point hypothesis draws, control characters included) and pieces
# that stress the pre-tokenizing regexes: contractions, digit runs, whitespace before text.
texts = st.lists(
    st.one_of(
        st.sampled_from([*PIECES, "'s", "'ll", "I'M", " 12345", "\t\t x", "  \n  y", "a\u200db"]), st.text(max_size=6)
    ),
    min_size=1,
    max_size=16,
).map("".join)


def plain_tokenizer(name: str):
    """The teacher's tokenizer as TeacherText uses it (no dummy prefix, special strings as
    text), and its byte table: the arguments of tiktoken_twin."""
    reason = T.missing_reason(name)
    if reason:
        pytest.skip(f"tokenizer {name} unavailable: {reason}")
    tokenizer = T.load(name)
    spec = without_dummy_prefix(json.loads(tokenizer.backend_tokenizer.to_str()))
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.encode_special_tokens = True
    return spec, backend, byte_table(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_tokens)


@pytest.fixture(scope="module", params=BYTE_LEVEL)
def twin_and_backend(request):
    spec, backend, table = plain_tokenizer(request.param)
    twin = tiktoken_twin(spec, backend, table)
    assert twin is not None, f"{request.param} should have a tiktoken twin"
    return twin, backend


@given(text=texts)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
def test_twin_encodes_random_unicode_like_hugging_face(twin_and_backend, text):
    twin, backend = twin_and_backend
    if twin.covers(text.encode()):
        assert twin.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_twin_encodes_gsm8k_like_hugging_face(twin_and_backend):
    twin, backend = twin_and_backend
    try:
        examples = T.gsm8k()[:400]
    except FileNotFoundError:
        pytest.skip("shared/data/gsm8k/test.jsonl not found")
    texts = [example[field] for example in examples for field in ("question", "answer")]
    assert [twin.encode(text) for text in texts] == [
        encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)
    ]


def test_bytes_without_a_token_are_left_to_hugging_face():
    twin = tiktoken_twin(*plain_tokenizer("smollm2"))
    assert twin.covers("plain text 123".encode())
    assert not twin.covers("a \x04 control byte".encode())  # SmolLM2 has no token for byte 4


def test_sentencepiece_has_no_twin():
    assert tiktoken_twin(*plain_tokenizer("mistral-sp-v1")) is None


def _byte_level_bpe(extra: dict[str, int], merges: list[tuple[str, str]]):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | extra
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return json.loads(backend.to_str()), backend, build_byte_table(backend.to_str())


def test_merges_out_of_id_order_get_no_twin():
    # `tokenizers` merges "a b" first (listed first), so "abc" is [ab, c]; ids as ranks would
    # merge "b c" first ([a, bc]). Every vocabulary token alone encodes the same in both.
    spec, backend, table = _byte_level_bpe({"bc": 256, "ab": 257}, [("a", "b"), ("b", "c")])
    assert backend.encode("abc").ids == [257, ord("c")]
    assert tiktoken_twin(spec, backend, table) is None
    spec, backend, table = _byte_level_bpe({"ab": 256, "bc": 257}, [("a", "b"), ("b", "c")])
    twin = tiktoken_twin(spec, backend, table)
    assert twin is not None and twin.encode("abc") == backend.encode("abc").ids == [256, ord("c")]
