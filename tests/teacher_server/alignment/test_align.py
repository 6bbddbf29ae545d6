"""Byte tables, tries and byte alignment on real tokenizers (no model): exact, property-tested."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from teacher_server.alignment.align import UNALIGNED, align
from teacher_server.alignment.byte_tables import UnsupportedTokenizer, build_byte_table, byte_table
from teacher_server.alignment.pair import pair_tables
from teacher_server.alignment.specials import PairError, special_map
from teacher_server.alignment.text import TeacherText
from testkit import tokenizers as T
from tests.helpers import PIECES

# Pieces that stress byte alignment: emoji (4-byte, ZWJ sequences), CJK, combining marks,
# whitespace runs, digits, and text that looks like special tokens.
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=4)), min_size=1, max_size=12).map(
    "".join
)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _available(name: str):
    reason = T.missing_reason(name)
    if reason:
        pytest.skip(f"tokenizer {name} unavailable: {reason}")
    return T.load(name)


@pytest.fixture(scope="module", params=T.NAMES)
def tokenizer(request):
    return _available(request.param)


def name_of(tokenizer) -> str:
    return next(name for name in T.NAMES if T.load(name) is tokenizer)


def table_of(tokenizer):
    return T.table(name_of(tokenizer))


def representable(table, text: str) -> bool:
    singles = {token[0] for token in table.tokens if len(token) == 1}
    return set(text.encode()) <= singles


def teacher_text(tokenizer) -> TeacherText:
    return T.teacher_text(name_of(tokenizer))


@given(text=texts)
@FAST
def test_byte_reconstruction_is_exact(tokenizer, text):
    table = table_of(tokenizer)
    # SmolLM2's vocabulary has no token for some bytes (e.g. 0xF1, the lead byte of U+40000..U+7FFFF):
    # its tokenizer drops such characters, so no table can give them back.
    assume(representable(table, text))
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    rebuilt = table.token_bytes(ids)
    expected = text.encode()
    if table.dummy_prefix and rebuilt != expected:
        expected = b" " + expected  # SentencePiece's dummy prefix: the decoder drops it again
    assert rebuilt == expected


def test_multibyte_character_split_over_tokens_round_trips():
    gpt2 = _available("gpt2")
    table = table_of(gpt2)
    ids = gpt2("北", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2, "GPT-2 splits this character over two byte tokens"
    assert [len(table.tokens[i]) for i in ids] == [2, 1]
    assert table.token_bytes(ids) == "北".encode()


def test_table_kinds_and_specials():
    expected = {
        "mistral-sp-v1": ("metaspace", True),
        "tekken": ("byte-level", False),
        "gpt2": ("byte-level", False),
        "smollm2": ("byte-level", False),
    }
    for name in T.available():
        tokenizer = T.load(name)
        table = table_of(tokenizer)
        assert (table.kind, table.dummy_prefix) == expected[name]
        for token in tokenizer.all_special_tokens:
            assert table.special[table.ids[token]] and table.tokens[table.ids[token]] == b""
    sp = table_of(_available("mistral-sp-v1"))
    assert sp.tokens[sp.ids["<0x0A>"]] == b"\n"  # byte fallback
    assert sp.tokens[sp.ids["<0x41>"]] == b"A" and not sp.preferred[sp.ids["<0x41>"]] and sp.preferred[sp.ids["A"]]


def test_tables_are_cached_by_content_hash():
    gpt2 = _available("gpt2")
    text = gpt2.backend_tokenizer.to_str()
    assert byte_table(text, ["<|endoftext|>"]) is byte_table(text, ["<|endoftext|>"])
    assert byte_table(text, ["<|endoftext|>"]) is not byte_table(text, [])
    smol = teacher_text(_available("tekken"))
    assert pair_tables(table_of(gpt2), smol) is pair_tables(table_of(gpt2), smol)


@pytest.mark.parametrize(
    "payload, needle",
    [
        ("not json", "JSON"),
        (json.dumps({"model": {"type": "Nope"}}), "Nope"),
        (
            json.dumps(
                {
                    "version": "1.0",
                    "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"},
                    "pre_tokenizer": {"type": "WhitespaceSplit"},
                }
            ),
            "WordLevel",
        ),
    ],
)
def test_unusable_tokenizers_are_refused_with_the_reason(payload, needle):
    with pytest.raises(UnsupportedTokenizer, match=needle):
        build_byte_table(payload)


def test_a_normalizer_that_rewrites_text_is_refused():
    gpt2 = _available("gpt2")
    spec = json.loads(gpt2.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(UnsupportedTokenizer, match="give back"):
        build_byte_table(json.dumps(spec))


def test_trie_walk_matches_a_python_search():
    student = table_of(_available("gpt2"))
    teacher = table_of(_available("mistral-sp-v1"))
    trie = pair_tables(student, teacher_text(_available("mistral-sp-v1"))).trie
    rng = random.Random(0)
    picks = [i for i in rng.sample(range(teacher.vocab_size), 3000) if teacher.tokens[i]]
    starts = teacher.starts[picks]
    node, best, depth = trie.walk(np.zeros(len(picks), np.int64), teacher.data, starts, starts + teacher.lengths[picks])
    vocab = {token: i for i, token in enumerate(student.tokens) if token and student.preferred[i]}
    for k, index in enumerate(picks):
        token = teacher.tokens[index]
        longest = max((n for n in range(1, len(token) + 1) if token[:n] in vocab), default=0)
        assert depth[k] == longest and (best[k] == (vocab[token[:longest]] if longest else -1))


PAIRS = [(s, t) for s in T.NAMES for t in T.NAMES if s != t]


@pytest.mark.parametrize("student_name, teacher_name", PAIRS)
def test_alignment_offsets_are_consistent(student_name, teacher_name):
    student, teacher = _available(student_name), _available(teacher_name)
    s_table, text = table_of(student), teacher_text(teacher)
    specials = special_map(s_table.special_vocab, text.table.special_vocab, [student.eos_token], [teacher.eos_token_id])

    @given(prompt=texts, completion=texts)
    # A metaspace teacher cannot write a literal "\u2581": it reads it as a space.
    @example(prompt="🙂", completion="\u2581")
    @example(prompt="🙂", completion="🙂\u2581")
    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    def check(prompt, completion):
        assume(representable(s_table, prompt + completion) and representable(text.table, prompt + completion))
        p = student(prompt, add_special_tokens=True)["input_ids"] or [student.eos_token_id]
        c = student(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [
            student.eos_token_id
        ]
        tokens = np.asarray(p + c)
        plan = align(tokens, len(p), s_table, text, specials)
        units = plan.units[: plan.num_units]
        # The stream is the completion's bytes, the student's EOS as one special unit at the end.
        assert units[:-1].astype(np.uint8).tobytes() == s_table.token_bytes(c[:-1]) and units[-1] >= 256
        # Teacher tokens tile a prefix of the stream and carry exactly its bytes; where the teacher's
        # encoding stops reproducing the text, the rest is UNALIGNED.
        tiled = int(plan.t_end[-1]) if len(plan.t_end) else 0
        assert (plan.t_start[:1] == 0).all() and (plan.t_start[1:] == plan.t_end[:-1]).all()
        completion_ids = plan.teacher_ids[plan.teacher_from :]
        for k, teacher_id in enumerate(completion_ids.tolist()):
            piece = units[plan.t_start[k] : plan.t_end[k]]
            if text.table.special[teacher_id]:
                assert len(piece) == 1 and piece[0] >= 256
            else:
                assert piece.astype(np.uint8).tobytes() == text.table.tokens[teacher_id]
        # Every position within the tiled prefix: its prefix ends inside (or at the start of) its teacher row.
        inside = plan.e <= tiled
        assert (plan.reason[~inside] == UNALIGNED).all()
        row, s, rho = plan.row[inside], plan.s[inside], plan.rho[inside]
        assert (row >= 0).all()
        assert (plan.t_start[row] <= s).all() and (s < plan.t_end[row]).all()
        assert (rho == s - plan.t_start[row]).all()
        assert (
            plan.e - plan.s == np.diff(np.concatenate([[0], np.cumsum([max(len(s_table.tokens[i]), 1) for i in c])]))
        ).all()

    check()


def test_invalid_utf8_from_a_byte_level_student_aligns_byte_for_byte():
    gpt2, smol = _available("gpt2"), _available("tekken")
    s_table, text = table_of(gpt2), teacher_text(smol)
    half = gpt2("北", add_special_tokens=False)["input_ids"][:1]  # the first two bytes of a 3-byte character
    tail = gpt2(" and 7 more", add_special_tokens=False)["input_ids"]
    prompt = gpt2("Q:", add_special_tokens=False)["input_ids"]
    tokens = np.asarray(prompt + half + tail)
    plan = align(
        tokens, len(prompt), s_table, text, special_map(s_table.special_vocab, text.table.special_vocab, [], [])
    )
    assert plan.units[: plan.num_units].astype(np.uint8).tobytes() == "北".encode()[:2] + b" and 7 more"
    assert (plan.reason == 0).all(), "invalid UTF-8 is still aligned (each stray byte is its own teacher token)"


def test_special_token_pairs_are_validated():
    gpt2, tekken = _available("gpt2"), _available("tekken")
    s_table, t_table = table_of(gpt2), table_of(tekken)
    with pytest.raises(PairError, match="not in the student"):
        special_map(s_table.special_vocab, t_table.special_vocab, [], [], pairs=[("<nope>", "</s>")])
    with pytest.raises(PairError, match="not a special token"):
        special_map(s_table.special_vocab, t_table.special_vocab, [], [], pairs=[("the", "</s>")])
    default = special_map(s_table.special_vocab, t_table.special_vocab, ["<|endoftext|>"], [t_table.ids["</s>"]])
    assert default.pairs == (("<|endoftext|>", "</s>"),)
    assert (
        special_map(
            s_table.special_vocab, t_table.special_vocab, ["<|endoftext|>"], [t_table.ids["</s>"]], pair_eos=False
        ).pairs
        == ()
    )
