"""WordLevel vocabularies with a Fuse decoder (the demo's tokenizer), aligned against another tokenizer.

The demo teacher's tokenizer (student_trainer/demo/task.py) is WordLevel, one token per
character, decoded with Fuse: every token's bytes are its UTF-8 string. The cross-tokenizer
student of opd-study (student_trainer/demo/xtok.py) is a BPE with the doubled digits as single
tokens and other special tokens. The teacher here is ScriptedTeacher (testkit/tokenizers.py).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from student_trainer.demo import task, xtok
from teacher_server.alignment.byte_tables import UnsupportedTokenizer, build_byte_table
from teacher_server.alignment.cross import NEVER_WRITTEN_LOGPROB, CrossTokenizer
from teacher_server.alignment.specials import special_map
from teacher_server.alignment.chat import TeacherChat
from teacher_server.alignment.text import TeacherText
from testkit import teachers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEMO = task.build_tokenizer()
XTOK = xtok.build_tokenizer()


def table_of(tokenizer):
    return build_byte_table(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_tokens)


def demo_spec() -> dict:
    return json.loads(DEMO.backend_tokenizer.to_str())


def test_wordlevel_with_a_fuse_decoder_has_a_byte_table():
    table = table_of(DEMO)
    assert table.kind == "plain" and not table.dummy_prefix
    for token in (task.PAD, task.BOS, task.EOS):
        assert table.special[table.ids[token]] and table.tokens[table.ids[token]] == b""
    assert [table.tokens[table.ids[c]] for c in "0123456789>"] == [c.encode() for c in "0123456789>"]
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice("0123456789>") for _ in range(rng.randint(1, 20)))
        ids = DEMO(text, add_special_tokens=False)["input_ids"]
        assert table.token_bytes(ids) == text.encode() == DEMO.decode(ids).encode()
    # The student's BPE: plain too, "77" is one token of two bytes.
    student = table_of(XTOK)
    assert student.kind == "plain" and student.tokens[student.ids["77"]] == b"77"
    assert all(student.special[student.ids[token]] for token in xtok.SPECIALS)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"decoder": None}, "Fuse decoder"),  # decoded with spaces between the words
        ({"decoder": {"type": "Strip", "content": " ", "start": 0, "stop": 0}}, "Fuse decoder"),
        ({"pre_tokenizer": {"type": "WhitespaceSplit"}}, "drops whitespace"),
        ({"normalizer": {"type": "Replace", "pattern": {"String": "1"}, "content": "2"}}, "give back"),
        ({"model": {"type": "WordPiece", "vocab": {"1": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}, "WordPiece"),
    ],
)
def test_wordlevel_that_cannot_be_read_back_is_still_refused(change, needle):
    with pytest.raises(UnsupportedTokenizer, match=needle):
        build_byte_table(json.dumps(demo_spec() | change))


def test_wordlevel_whose_words_do_not_encode_back_to_back_is_refused():
    """Whole words split by a word pattern: "catdog" (two tokens back to back) is no word of its vocabulary."""
    spec = demo_spec() | {
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "[a-z]+|[^a-z]"},
            "behavior": "Isolated",
            "invert": False,
        }
    }
    spec["model"] = {
        "type": "WordLevel",
        "vocab": {"cat": 0, "dog": 1, " ": 2},
        "unk_token": "<unk>",
    }  # not in it: raises
    spec["added_tokens"], spec["post_processor"] = [], None
    with pytest.raises(UnsupportedTokenizer, match="cannot encode"):
        build_byte_table(json.dumps(spec))


def demo_teacher_text() -> TeacherText:
    return TeacherText(table_of(DEMO), TeacherChat(DEMO.backend_tokenizer.to_str(), "", DEMO.bos_token, DEMO.eos_token))


def test_teacher_text_stops_where_its_vocabulary_ends():
    text = demo_teacher_text()
    assert text.start_ids().tolist() == [DEMO.bos_token_id]  # found with a character it can spell, not "a"
    ids, good = text.encode(b"12>")
    assert good == 3 and ids.tolist() == DEMO("12>", add_special_tokens=False)["input_ids"]
    ids, good = text.encode(b"12a3")  # WordLevel without an unknown token raises on "a": the prefix is kept
    assert good == 2 and ids.tolist() == DEMO("12", add_special_tokens=False)["input_ids"]
    assert text.plain_ids(["77", "x7"]) == [DEMO("77", add_special_tokens=False)["input_ids"], None]


def xtok_against_demo(script: dict[str, dict[str, float]], completion: list[str], top_k: int = 8, mask: bool = True):
    """Score a student completion (xtok tokens) of the prompt "12>" against a scripted demo teacher."""
    student, text = table_of(XTOK), demo_teacher_text()
    specials = special_map(
        student.special_vocab, text.table.special_vocab, [XTOK.eos_token], [DEMO.eos_token_id], mask=mask
    )
    engine = teachers.ScriptedTeacher(text.table, None, None)
    cross = CrossTokenizer.build(student, text, specials, engine.vocab_size, engine.max_sequence_length)
    prompt = XTOK("12>")["input_ids"]
    tokens = np.asarray(prompt + XTOK.convert_tokens_to_ids(completion))
    plan = cross.align(tokens, len(prompt))
    by_text = {
        key.encode(): {DEMO.convert_tokens_to_ids(t): p for t, p in value.items()} for key, value in script.items()
    }
    engine.prompt_length_of = lambda job: plan.teacher_from
    engine.script = lambda context: by_text.get(context, {})
    return plan, cross.score(engine, tokens, len(prompt), top_k)


def support(result, row: int) -> dict[str, float]:
    return {
        XTOK.convert_ids_to_tokens(int(i)): float(np.exp(lp))
        for i, lp in zip(result.ids[row], result.logprobs[row])
        if i >= 0 and np.exp(lp) > 1e-9
    }


def test_a_double_digit_student_token_gets_the_teacher_chain_rule():
    script = {
        "": {"7": 0.6, "3": 0.4},
        "7": {"7": 0.5, "3": 0.5},
        "3": {"3": 0.25, "7": 0.75},
        "77": {"3": 1.0},
        "773": {"<eos>": 0.9, "3": 0.1},
    }
    plan, result = xtok_against_demo(script, ["77", "3", "</s>"])
    # The teacher reads "<bos>12>" then "7", "7", "3", <eos>: the student's <s> maps onto the teacher's start.
    assert plan.teacher_ids.tolist() == DEMO("12>773")["input_ids"] + [DEMO.eos_token_id]
    got = support(result, 0)
    # "77" is "7" then "7"; "7" alone is "7" then anything else; likewise "33" and "3".
    expected = {"77": 0.6 * 0.5, "7": 0.6 * 0.5, "33": 0.4 * 0.25, "3": 0.4 * 0.75}
    assert got.keys() >= expected.keys()
    for token, prob in expected.items():
        assert got[token] == pytest.approx(prob, rel=1e-4), (token, got)
    assert result.token_logprobs[0] == pytest.approx(np.log(0.3), abs=1e-4)  # log P(7) + log P(7 | 7)
    assert result.token_logprobs[2] == pytest.approx(np.log(0.9), abs=1e-4)  # </s> paired with <eos>
    assert result.mask.tolist() == [1, 1, 1]


def test_an_unpaired_student_control_token_is_dropped_and_masked():
    script = {"": {"7": 1.0}, "7": {"3": 1.0}, "73": {"<eos>": 1.0}}
    plan, result = xtok_against_demo(script, ["7", "<think>", "3", "</s>"])
    # The teacher never sees <think>; its position and the one right after it carry no loss.
    assert plan.teacher_ids.tolist() == DEMO("12>73")["input_ids"] + [DEMO.eos_token_id]
    assert result.mask.tolist() == [1, 0, 0, 1] and (result.reason[1:3] == 1).all()  # 1 = SPECIAL


def test_without_masking_an_unpaired_control_token_stays_in_the_loss():
    """no_special_token_masking: the <think> position takes the teacher's distribution at that point
    of the text (the next position's: no teacher text lies between them), its own token the floor
    log-probability; the position after it is scored on the text run together."""
    script = {"": {"7": 1.0}, "7": {"3": 0.8, "7": 0.2}, "73": {"<eos>": 1.0}}
    plan, masked = xtok_against_demo(script, ["7", "<think>", "3", "</s>"])
    plan, unmasked = xtok_against_demo(script, ["7", "<think>", "3", "</s>"], mask=False)
    assert plan.teacher_ids.tolist() == DEMO("12>73")["input_ids"] + [DEMO.eos_token_id]  # still left out
    assert unmasked.mask.tolist() == [1, 1, 1, 1] and (unmasked.reason == 0).all()
    assert unmasked.counts.with_distribution == 4 and unmasked.counts.special == 0
    np.testing.assert_array_equal(unmasked.ids[1], unmasked.ids[2])
    np.testing.assert_array_equal(unmasked.logprobs[1], unmasked.logprobs[2])
    got = support(unmasked, 1)  # the teacher's next token after "7": "3" (0.8) or "7" (the student's "7" or "77")
    assert got["3"] == pytest.approx(0.8, rel=1e-4) and set(got) == {"3", "7", "77"}
    assert unmasked.token_logprobs[1] == NEVER_WRITTEN_LOGPROB < -80
    assert unmasked.token_logprobs[2] == pytest.approx(np.log(0.8), abs=1e-4)
    # Two in a row share it too.
    _, twice = xtok_against_demo(script, ["7", "<think>", "<think>", "3", "</s>"], mask=False)
    assert twice.mask.tolist() == [1] * 5 and (twice.token_logprobs[1:3] == NEVER_WRITTEN_LOGPROB).all()
    np.testing.assert_array_equal(twice.ids[1], twice.ids[3])
    np.testing.assert_array_equal(twice.ids[2], twice.ids[3])
    # Everything else is what the masked session answers.
    np.testing.assert_array_equal(unmasked.ids[[0, 3]], masked.ids[[0, 3]])
    np.testing.assert_array_equal(unmasked.token_logprobs[[0, 3]], masked.token_logprobs[[0, 3]])
    # A control token with no text after it has no distribution: UNALIGNED, not SPECIAL.
    _, trailing = xtok_against_demo(script, ["7", "3", "<think>"], mask=False)
    assert trailing.mask.tolist() == [1, 1, 0] and trailing.reason[2] == 2  # 2 = UNALIGNED


@pytest.mark.parametrize("inside, low_mass", [(2, True), (3, False)])
def test_inside_a_teacher_token_the_boundary_row_is_read_wider(inside, low_mass):
    """The demo student writes "7", "7" where a teacher with the xtok vocabulary writes "77": the
    second "7" is predicted inside the teacher token, from the candidates at its start that begin
    with "7". With 2 candidates read there, "7" (ranked third) is missed, the rollout's own "77" alone
    is too little to condition on (LOW_MASS); `inside_candidates` = 3 reads it."""
    from teacher_server.alignment.cross import CrossOptions

    teacher, student = table_of(XTOK), table_of(DEMO)
    text = TeacherText(teacher, TeacherChat(XTOK.backend_tokenizer.to_str(), "", XTOK.bos_token, XTOK.eos_token))
    specials = special_map(student.special_vocab, teacher.special_vocab, [DEMO.eos_token], [XTOK.eos_token_id])
    engine = teachers.ScriptedTeacher(teacher, None, None)
    options = CrossOptions(candidates=2, inside_candidates=inside)
    cross = CrossTokenizer.build(student, text, specials, engine.vocab_size, engine.max_sequence_length, options)
    prompt = DEMO("12>")["input_ids"]
    tokens = np.asarray(prompt + DEMO.convert_tokens_to_ids(["7", "7", "<eos>"]))
    plan = cross.align(tokens, len(prompt))
    assert XTOK.convert_ids_to_tokens(plan.teacher_ids[plan.teacher_from :].tolist()) == ["77", "</s>"]
    ids = {t: XTOK.convert_tokens_to_ids(t) for t in ("3", "5", "7", "77", "</s>")}
    script = {
        b"": {ids["3"]: 0.5, ids["5"]: 0.3, ids["7"]: 0.1, ids["77"]: 0.001},
        b"7": {ids["7"]: 0.9},
        b"77": {ids["</s>"]: 1.0},
    }
    engine.prompt_length_of = lambda job: plan.teacher_from
    engine.script = lambda context: script.get(context, {})
    result = cross.score(engine, tokens, len(prompt), 4)
    assert result.reason[1] == (3 if low_mass else 0)  # 3 = LOW_MASS
    if not low_mass:  # after "7" the teacher writes "7" again: "77" (0.001) or "7", "7" (0.1 x 0.9)
        assert DEMO.convert_ids_to_tokens(int(result.ids[1, 0])) == "7"
        assert np.exp(result.logprobs[1, 0]) > 0.9
    assert result.reason[0] == 0 and result.reason[2] == 0
    # The first "7" starts on the boundary: it reads 2 candidates whatever `inside` is, so of the
    # teacher's "7" and "77" only the rollout's own "77" (always read) reaches it.
    first = {
        DEMO.convert_ids_to_tokens(int(i)): float(np.exp(lp))
        for i, lp in zip(result.ids[0], result.logprobs[0])
        if i >= 0
    }
    assert first["7"] == pytest.approx(0.001, rel=1e-3)


def test_a_single_digit_the_teacher_would_double_leaves_the_double_to_the_double_token():
    """The student writes "3" then "8" where the teacher goes on with "3": the teacher's "3", "3" is
    the student's "33" (its tokenizer merges it), not its "3" (pair.first_after: the demo vocabulary
    cannot spell the space that ends a word, so the joined digits alone decide)."""
    script = {"": {"3": 1.0}, "3": {"3": 0.9, "8": 0.1}, "38": {"<eos>": 1.0}}
    _, result = xtok_against_demo(script, ["3", "8", "</s>"])
    got = support(result, 0)
    assert got["33"] == pytest.approx(0.9, rel=1e-4) and got["3"] == pytest.approx(0.1, rel=1e-4)
    assert result.token_logprobs[0] == pytest.approx(0.0, abs=1e-4)  # the chain rule of its own text: P("3") = 1
