"""The projection with hand-written teacher probabilities on real tokenizers: exact expectations.

The teacher here is ScriptedTeacher (testkit/tokenizers.py): its next-token probabilities
depend on the text after the prompt, so every expected value below is a product of the
script's numbers.
"""

from __future__ import annotations


import numpy as np
import pytest

from opd.v1 import teacher_pb2
from teacher_server.alignment.cross import CrossOptions
from testkit import teachers
from testkit import tokenizers as T

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def need(*names):
    for name in names:
        reason = T.missing_reason(name)
        if reason:
            pytest.skip(f"tokenizer {name} unavailable: {reason}")


def teacher_id(name: str, text: str) -> int:
    ids = T.load(name)(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} {name} tokens"
    return ids[0]


def run(
    student: str,
    teacher: str,
    completion_ids: list[int],
    script: dict,
    top_k: int = 8,
    rounds: int = 1,
    prompt: str = "Q:",
    pairs=(),
    pair_eos=True,
):
    """Score `completion_ids` (student ids) after `prompt` with a teacher that follows `script`."""
    s = T.load(student)
    prompt_ids = s(prompt, add_special_tokens=False)["input_ids"]
    tokens = np.asarray(prompt_ids + completion_ids)
    engine = teachers.ScriptedTeacher(T.table(teacher), None, None)
    cross = teachers.cross(student, teacher, engine, CrossOptions(rounds=rounds), pairs=pairs, pair_eos=pair_eos)
    plan = cross.align(tokens, len(prompt_ids))
    by_text = {
        key.encode(): {teacher_id(teacher, tok) if isinstance(tok, str) else tok: p for tok, p in value.items()}
        for key, value in script.items()
    }
    engine.prompt_length_of = lambda job: plan.teacher_from
    engine.script = lambda context: by_text.get(context, {})
    return cross, cross.score(engine, tokens, len(prompt_ids), top_k)


def support(result, row: int, student: str) -> dict[str, float]:
    tokenizer = T.load(student)
    # Entries of negligible mass come from the script's "spread the rest evenly" tail.
    return {
        tokenizer.convert_ids_to_tokens(int(i)): float(np.exp(lp))
        for i, lp in zip(result.ids[row], result.logprobs[row])
        if i >= 0 and np.exp(lp) > 1e-9
    }


def test_student_token_spanning_several_teacher_tokens_gets_the_chain_rule():
    """GPT-2 writes " 130" as one token, SmolLM2 as " ", "1", "3", "0" (the known pitfall)."""
    need("gpt2", "smollm2")
    gpt2 = T.load("gpt2")
    completion = gpt2(" costs 130 dollars", add_special_tokens=False)["input_ids"]
    assert gpt2.convert_ids_to_tokens(completion) == ["Ġcosts", "Ġ130", "Ġdollars"]
    script = {
        "": {" costs": 1.0},
        " costs": {" ": 0.8, " more": 0.2},
        " costs more": {" than": 1.0},
        " costs ": {"1": 0.6, "2": 0.4},
        " costs 1": {"3": 0.5, "5": 0.5},
        " costs 13": {"0": 0.9, " ": 0.1},
        " costs 130": {" dollars": 1.0},
        " costs 15": {"0": 1.0},
        " costs 150": {" ": 1.0},
        " costs 2": {"0": 1.0},
        " costs 20": {" ": 1.0},
    }
    _, result = run("gpt2", "smollm2", completion, script, rounds=2)
    got = support(result, 1, "gpt2")
    # Along the rollout: " " "1" "3" "0" is the student's own " 130" (chain rule); " 13" then " "
    # lands on " 13"; the alternatives " 15.." and " 2.." are followed by two rounds of branches to
    # " 150" and " 20" (GPT-2 has " 1500" and " 200": the text decides only after the last digit).
    expected = {
        "Ġ20": 0.8 * 0.4,
        "Ġ150": 0.8 * 0.6 * 0.5,
        "Ġ130": 0.8 * 0.6 * 0.5 * 0.9,
        "Ġmore": 0.2,
        "Ġ13": 0.8 * 0.6 * 0.5 * 0.1,
    }
    for token, prob in expected.items():
        assert got[token] == pytest.approx(prob, rel=1e-5), (token, got)
    assert result.token_logprobs[1] == pytest.approx(np.log(0.216), abs=1e-5)
    assert result.mask.all()

    # With too few rounds the alternatives stay unresolved (" 2" may be on its way to " 20"): with
    # 56% of the mass on such paths the position is LOW_MASS.
    for rounds in (0, 1):
        _, short = run("gpt2", "smollm2", completion, script, rounds=rounds)
        assert short.reason[1] == teacher_pb2.MASK_REASON_LOW_MASS and short.mask[[0, 2]].all(), rounds
        assert short.counts.unresolved_paths > 0


def test_position_inside_a_teacher_token_is_conditioned_on_the_partial_bytes():
    """SmolLM2 writes "1", "3", "0"; GPT-2's " 130" is one token: three student positions inside it."""
    need("gpt2", "smollm2")
    smol = T.load("smollm2")
    completion = smol(" costs 130 dollars", add_special_tokens=False)["input_ids"]
    assert smol.convert_ids_to_tokens(completion) == ["Ġcosts", "Ġ", "1", "3", "0", "Ġdollars"]
    script = {
        "": {" costs": 1.0},
        " costs": {" 130": 0.5, " 120": 0.2, " 13": 0.1, " 1": 0.1, " 2": 0.1},
        " costs 1": {"3": 0.5, "0": 0.5},
        " costs 13": {"0": 1.0},
        " costs 130": {" dollars": 1.0},
    }
    _, result = run("smollm2", "gpt2", completion, script, rounds=1)
    assert support(result, 1, "smollm2") == pytest.approx({"Ġ": 1.0}, rel=1e-5)
    assert support(result, 2, "smollm2") == pytest.approx({"1": 0.9, "2": 0.1}, rel=1e-5)
    # r = " 1": " 130", " 13" and " 1"+"3" continue with "3"; " 120" with "2"; " 1"+"0" with "0".
    z = 0.5 + 0.2 + 0.1 + 0.05 + 0.05
    assert support(result, 3, "smollm2") == pytest.approx({"3": 0.65 / z, "2": 0.2 / z, "0": 0.05 / z}, rel=1e-5)
    # r = " 13": the path " 1" "3" needs a second round to pass r, so one round leaves it out.
    assert support(result, 4, "smollm2") == pytest.approx({"0": 1.0}, rel=1e-5)
    assert result.token_logprobs[3] == pytest.approx(np.log(0.65 / z), abs=1e-5)
    assert result.mask.all()


def test_eos_is_paired_by_default_and_masked_on_request():
    need("gpt2", "smollm2")
    gpt2 = T.load("gpt2")
    completion = gpt2(" done", add_special_tokens=False)["input_ids"] + [gpt2.eos_token_id]
    im_end = T.load("smollm2").convert_tokens_to_ids("<|im_end|>")
    script = {"": {" done": 1.0}, " done": {im_end: 0.7, ".": 0.3}, " done.": {im_end: 1.0}}
    _, result = run("gpt2", "smollm2", completion, script)
    assert support(result, 1, "gpt2") == pytest.approx({"<|endoftext|>": 0.7, ".": 0.3}, rel=1e-5)
    assert result.mask[1] == 1 and result.token_logprobs[1] == pytest.approx(np.log(0.7), abs=1e-5)

    _, unpaired = run("gpt2", "smollm2", completion, script, pair_eos=False)
    assert unpaired.mask[1] == 0 and unpaired.reason[1] == 1  # SPECIAL
    assert unpaired.counts.special == 1


@pytest.fixture(scope="module")
def thinking_gpt2(tmp_path_factory):
    """GPT-2 with <think> and </think> added as special tokens (a reasoning student)."""
    need("gpt2", "smollm2")
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(T.load("gpt2").backend_tokenizer.to_str())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tokenizer


def test_think_tokens_are_masked_and_removed_from_the_teacher_text(thinking_gpt2):
    tokenizer = thinking_gpt2
    from teacher_server.alignment.byte_tables import byte_table
    from teacher_server.alignment.cross import CrossTokenizer
    from teacher_server.alignment.specials import special_map

    s_table = byte_table(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_tokens)
    text = T.teacher_text("smollm2")
    completion = tokenizer("<think> so</think> done", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(completion) == ["<think>", "Ġso", "</think>", "Ġdone", "<|endoftext|>"]
    prompt = tokenizer("Q:", add_special_tokens=False)["input_ids"]
    tokens = np.asarray(prompt + completion)
    im_end = text.table.ids["<|im_end|>"]

    def score(pairs=()):
        specials = special_map(s_table.special_vocab, text.table.special_vocab, ["<|endoftext|>"], [im_end], pairs)
        engine = teachers.ScriptedTeacher(text.table, None, None)
        cross = CrossTokenizer.build(s_table, text, specials, engine.vocab_size, engine.max_sequence_length)
        plan = cross.align(tokens, len(prompt))
        script = {
            b"": {teacher_id("smollm2", " so"): 0.9},
            b" so": {teacher_id("smollm2", " done"): 0.6},
            b" so done": {im_end: 0.8},
            b"<think> so done": {im_end: 0.8},
            b"<think>": {teacher_id("smollm2", " so"): 0.5},
            b"<think> so": {teacher_id("smollm2", "</"): 0.5},
        }
        engine.prompt_length_of = lambda job: plan.teacher_from
        engine.script = lambda context: script.get(context, {})
        return plan, cross.score(engine, tokens, len(prompt), 8)

    plan, result = score()
    # The teacher reads " so done": the think tokens take no bytes.
    assert plan.units[: plan.num_units - 1].astype(np.uint8).tobytes() == b" so done"
    # Masked: the think tokens and the token right after each (its teacher context lost a token).
    assert list(result.mask) == [0, 0, 0, 0, 1] and (result.reason[:4] == 1).all()
    assert result.token_logprobs[4] == pytest.approx(np.log(0.8), abs=1e-5)  # EOS paired with <|im_end|>
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    assert not specials & set(result.ids.reshape(-1).tolist()), "special tokens never appear in the support"

    # Paired on request with the teacher's plain text "<think>": the student's token stands for those bytes.
    plan, paired = score(pairs=[("<think>", "<think>")])
    assert plan.units[: plan.num_units - 1].astype(np.uint8).tobytes() == b"<think> so done"
    assert list(paired.mask) == [1, 1, 0, 0, 1]
    assert paired.token_logprobs[1] == pytest.approx(np.log(0.5), abs=1e-5)


def sentencepiece_completion(text: str) -> list[int]:
    """The SentencePiece student's ids of `text` after the prompt "Q:" (as it splits the whole text)."""
    sp = T.load("mistral-sp-v1")
    ids = sp("Q:" + text, add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(ids[:2]) == ["▁Q", ":"]
    return ids[2:]


def test_lone_space_before_a_number_keeps_only_its_own_mass():
    """The student's " " before "3" is a byte-prefix of " three", " a", " two": those are other
    text (the student writes them as " three", ...), not its lone space."""
    need("mistral-sp-v1", "smollm2")
    completion = sentencepiece_completion(" eats 3 eggs")
    assert T.load("mistral-sp-v1").convert_ids_to_tokens(completion) == ["▁e", "ats", "▁", "3", "▁eggs"]
    script = {
        "": {" eats": 1.0},
        " eats": {" ": 0.34, " three": 0.20, " a": 0.06, " two": 0.03, " eggs": 0.37},
        " eats ": {"3": 1.0},
        " eats 3": {" eggs": 1.0},
        " eats three": {" eggs": 1.0},
        " eats a": {" egg": 1.0},
        " eats two": {" eggs": 1.0},
    }
    _, result = run("mistral-sp-v1", "smollm2", completion, script)
    expected = {"▁": 0.34, "▁three": 0.20, "▁a": 0.06, "▁two": 0.03, "▁eggs": 0.37}
    assert support(result, 2, "mistral-sp-v1") == pytest.approx(expected, rel=1e-5)
    assert result.token_logprobs[2] == pytest.approx(np.log(0.34), abs=1e-5)  # the chain rule
    assert result.mask.all()


def test_short_word_before_a_longer_one_keeps_only_its_own_mass():
    """ " a" before " total" is a byte-prefix of " and", " all", " about"; " duck" before " eggs" of
    " ducks", which the student writes " d", "ucks" (its BPE does not take the longest match)."""
    need("mistral-sp-v1", "smollm2")
    completion = sentencepiece_completion(" eats a total")
    assert T.load("mistral-sp-v1").convert_ids_to_tokens(completion) == ["▁e", "ats", "▁a", "▁total"]
    script = {
        "": {" eats": 1.0},
        " eats": {" a": 0.5, " and": 0.2, " all": 0.1, " about": 0.1, " the": 0.1},
        " eats a": {" total": 1.0},
        # " and", " all" may begin longer student words (" andere"): the branch round reads on.
        **{f" eats{word}": {" eggs": 1.0} for word in (" and", " all", " about", " the")},
    }
    _, result = run("mistral-sp-v1", "smollm2", completion, script)
    expected = {"▁a": 0.5, "▁and": 0.2, "▁all": 0.1, "▁about": 0.1, "▁the": 0.1}
    assert support(result, 2, "mistral-sp-v1") == pytest.approx(expected, rel=1e-5)
    assert result.token_logprobs[2] == pytest.approx(np.log(0.5), abs=1e-5)

    completion = sentencepiece_completion(" a duck eggs")
    assert T.load("mistral-sp-v1").convert_ids_to_tokens(completion) == ["▁a", "▁duck", "▁eggs"]
    script = {
        "": {" a": 1.0},
        " a": {" duck": 0.5, " ducks": 0.3, " dog": 0.2},
        " a duck": {" eggs": 1.0},
        " a ducks": {" eggs": 1.0},
        " a dog": {" eggs": 1.0},
    }
    _, result = run("mistral-sp-v1", "smollm2", completion, script)
    assert support(result, 1, "mistral-sp-v1") == pytest.approx({"▁duck": 0.5, "▁d": 0.3, "▁dog": 0.2}, rel=1e-5)
    assert result.token_logprobs[1] == pytest.approx(np.log(0.5), abs=1e-5)
    assert result.mask.all()


def test_word_that_goes_on_past_the_target_lands_where_the_student_splits_it():
    """The teacher's " restart" is the student's target only where its text makes the student write
    it: " restart" then "s" is " restarts", which the student writes " rest", "arts"; " restarting"
    it writes " restart", "ing"; " the" begins a new word."""
    need("mistral-sp-v1", "smollm2")
    completion = sentencepiece_completion(" restart the")
    assert T.load("mistral-sp-v1").convert_ids_to_tokens(completion) == ["▁restart", "▁the"]
    script = {
        "": {" restart": 0.6, " stop": 0.4},
        " restart": {" the": 0.5, "s": 0.3, "ing": 0.2},
        " restart the": {" game": 1.0},
        " stop": {" the": 1.0},
    }
    _, result = run("mistral-sp-v1", "smollm2", completion, script)
    expected = {"▁restart": 0.6 * (0.5 + 0.2), "▁rest": 0.6 * 0.3, "▁stop": 0.4}
    assert support(result, 0, "mistral-sp-v1") == pytest.approx(expected, rel=1e-5)
    assert result.token_logprobs[0] == pytest.approx(np.log(0.6), abs=1e-5), "token_logprobs stays the chain rule"


def test_a_sampled_split_the_tokenizer_would_not_write_does_not_keep_the_text():
    """The student sampled " 1", "1" for " 11", which its tokenizer writes " 11": at the first
    position the teacher's " 11..." is the student's " 11", whatever was sampled there, so the
    distribution there is the one a student that sampled " 2" gets (it must not depend on the token
    sampled at the position); the target keeps " 1" followed by a new word."""
    need("gpt2", "smollm2")
    gpt2 = T.load("gpt2")
    completion = gpt2.convert_tokens_to_ids(["Ġ1", "1", "Ġeggs"])
    script = {
        "": {" ": 1.0},
        " ": {"1": 0.8, "2": 0.2},
        " 1": {"1": 0.5, " eggs": 0.5},
        " 11": {" eggs": 1.0},
        " 2": {" eggs": 1.0},
    }
    _, result = run("gpt2", "smollm2", completion, script)
    assert support(result, 0, "gpt2") == pytest.approx({"Ġ11": 0.4, "Ġ1": 0.4, "Ġ2": 0.2}, rel=1e-5)
    assert result.token_logprobs[0] == pytest.approx(np.log(0.8), abs=1e-5), "token_logprobs stays the chain rule"
    assert support(result, 1, "gpt2") == pytest.approx({"1": 0.5, "Ġeggs": 0.5}, rel=1e-5)
    sampled_other = gpt2.convert_tokens_to_ids(["Ġ2", "Ġeggs"])
    _, other = run("gpt2", "smollm2", sampled_other, script)
    assert support(other, 0, "gpt2") == pytest.approx(support(result, 0, "gpt2"), rel=1e-5)


def test_the_tokenizers_own_split_keeps_its_text_though_the_next_teacher_token_alone_reads_otherwise():
    """GPT-2 writes " 1150" as " 11", "50", though " 115" alone is one token: the teacher's "5" after
    " 11" (one digit at a time) is the rollout's own text, which the student's tokenizer begins with
    " 11", so it stays on the target; another digit ("2": " 112") is other text."""
    need("gpt2", "smollm2")
    gpt2 = T.load("gpt2")
    completion = gpt2.convert_tokens_to_ids(["Ġ11", "50", "Ġeggs"])
    assert gpt2(" 1150 eggs", add_special_tokens=False)["input_ids"] == completion, "the tokenizer's own split"
    script = {
        "": {" ": 1.0},
        " ": {"1": 1.0},
        " 1": {"1": 1.0},
        " 11": {"5": 0.5, "2": 0.1, " eggs": 0.4},
        " 112": {" eggs": 1.0},
    }
    _, result = run("gpt2", "smollm2", completion, script)
    assert support(result, 0, "gpt2") == pytest.approx({"Ġ11": 0.9, "Ġ112": 0.1}, rel=1e-5)
