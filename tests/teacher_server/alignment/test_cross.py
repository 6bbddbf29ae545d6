"""Cross-tokenizer scoring on real tokenizers and GSM8K answers: coverage, the service, special tokens.

Coverage is measured for every ordered pair of four real tokenizers. Only SmolLM2 has a
model here, so the pairs use a bigram teacher of the teacher's tokenizer (testkit/tokenizers.py,
fitted on half of the answers, scored on the other half); the pairs with SmolLM2 as the
teacher also run the real model (test_fidelity.py).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.alignment.result import Coverage
from testkit import teachers
from testkit import tokenizers as T

UNALIGNED = teacher_pb2.MASK_REASON_UNALIGNED

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MIN_COVERAGE = 0.97
PAIRS = [(s, t) for t in T.NAMES for s in T.NAMES if s != t]


def need(*names):
    for name in names:
        reason = T.missing_reason(name)
        if reason:
            pytest.skip(f"tokenizer {name} unavailable: {reason}")


@pytest.fixture(scope="module")
def answers():
    try:
        data = T.gsm8k()
    except FileNotFoundError:
        pytest.skip("shared/data/gsm8k/test.jsonl not found")
    return data


def rollout(student: str, example: dict) -> tuple[list[int], int]:
    """GSM8K question as the prompt, its reference answer + EOS as the completion."""
    tokenizer = T.load(student)
    prompt = tokenizer(example["question"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


_bigrams: dict[str, teachers.BigramTeacher] = {}


def bigram(teacher: str, answers) -> teachers.BigramTeacher:
    if teacher not in _bigrams:
        _bigrams[teacher] = teachers.BigramTeacher(T.load(teacher), [example["answer"] for example in answers[::2]])
    return _bigrams[teacher]


def coverage_of(student: str, teacher: str, engine, examples, **score) -> Coverage:
    cross = teachers.cross(student, teacher, engine)
    total = Coverage()
    for example in examples:
        tokens, score_from = rollout(student, example)
        total.add(cross.score(engine, tokens, score_from, 16, **score).counts)
    return total


def test_text_the_teacher_cannot_write_is_masked_unaligned(answers):
    """A metaspace teacher reads a literal "\u2581" as a space, so its encoding of a completion that
    holds one stops there: those positions (all of them, if it starts the completion) are UNALIGNED."""
    need("gpt2", "mistral-sp-v1")
    student, engine = T.load("gpt2"), bigram("mistral-sp-v1", answers)
    cross = teachers.cross("gpt2", "mistral-sp-v1", engine)
    prompt = student("Hi there")["input_ids"]
    for completion, aligned in (("\u2581", 0), ("ok\u2581 then", 1)):
        targets = student(completion)["input_ids"] + [student.eos_token_id]
        result = cross.score(engine, prompt + targets, len(prompt), 8)
        assert len(result.reason) == len(targets)
        assert (result.reason[aligned:] == UNALIGNED).all() and (result.reason[:aligned] != UNALIGNED).all()


@pytest.mark.parametrize("student, teacher", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
def test_coverage_on_gsm8k_answers(student, teacher, answers):
    need(student, teacher)
    examples = answers[1::2][:12]
    total = coverage_of(student, teacher, bigram(teacher, answers), examples)
    print(
        f"\n{student} -> {teacher} (bigram teacher): coverage {total.coverage:.4f} of {total.positions} positions, "
        f"mean retained mass {total.mean_retained_mass:.3f}, low_mass {total.low_mass}, unaligned {total.unaligned}, "
        f"branches {total.branch_sequences}"
    )
    # Every position is aligned. LOW_MASS (inside a teacher token, the consistent paths read carry
    # less than the unread candidates could) depends on the teacher: this bigram stand-in spreads
    # much of its mass outside any top 64, so its masked share is reported, not bounded here.
    assert total.unaligned == 0 and total.special == 0 and total.beyond_context == 0
    aligned = (total.positions - total.unaligned - total.special - total.beyond_context) / total.positions
    assert aligned >= MIN_COVERAGE


def test_student_130_gets_its_own_token_from_the_real_teacher(smollm2):
    """GPT-2's " 130" is one token; SmolLM2 writes " ", "1", "3", "0": the support offers " 130" itself."""
    need("gpt2")
    engine = teachers.smollm2_engine()
    gpt2 = T.load("gpt2")
    prompt = gpt2(
        "Q: A shirt costs 80 dollars and a hat 50 dollars. What do both cost?\nA: 80 + 50 =", add_special_tokens=False
    )["input_ids"]
    completion = gpt2(" 130 dollars.", add_special_tokens=False)["input_ids"]
    position = gpt2.convert_ids_to_tokens(completion).index("Ġ130")
    result = teachers.cross("gpt2", "smollm2", engine).score(engine, prompt + completion, len(prompt), 8)
    support = {
        gpt2.convert_ids_to_tokens(int(i)): float(np.exp(lp))
        for i, lp in zip(result.ids[position], result.logprobs[position])
        if i >= 0
    }
    print(f"\nsupport at ' 130': {support}")
    assert "Ġ130" in support
    multi_digit = [token for token in support if token.lstrip("Ġ").isdigit() and len(token.lstrip("Ġ")) > 1]
    assert len(multi_digit) >= 2, f"student-vocabulary numbers, not just their first digit: {support}"
    # The student's own token: the exact chain rule over the teacher tokens it spans.
    plan = teachers.cross("gpt2", "smollm2", engine).align(np.asarray(prompt + completion), len(prompt))
    start = plan.teacher_from + plan.row[position]
    end = plan.teacher_from + int(np.searchsorted(plan.t_end, plan.e[position], side="left")) + 1
    from teacher_server.engines import ScoringJob

    direct = engine.score([ScoringJob(plan.teacher_ids[:end], start, 1)])[0].token_logprobs.astype(np.float64).sum()
    assert result.token_logprobs[position] == pytest.approx(direct, abs=1e-4)


# ----------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    from tests.conftest import LiveServer, server_config

    server = LiveServer(server_config(smollm2, max_k=32, chunk_size=64))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(smollm2_server):
    import grpc

    channel = grpc.insecure_channel(smollm2_server.target)
    yield teacher_pb2_grpc.TeacherStub(channel)
    channel.close()


def hf_message(tokenizer) -> teacher_pb2.HFTokenizer:
    from student_trainer.messages import tokenizer_message

    return tokenizer_message(tokenizer)


def score(stub, session_id, tokens, score_from, top_k=8, messages=(), teacher_prompt_ids=None, score_mask=None):
    request = teacher_pb2.ScoreRequest(
        request_id=1,
        session_id=session_id,
        tokens=to_tensor(np.asarray(tokens, np.int32)),
        score_from=score_from,
        top_k=top_k,
        messages=[teacher_pb2.ChatMessage(role=r, content=c) for r, c in messages],
    )
    if teacher_prompt_ids is not None:
        request.teacher_prompt_ids.CopyFrom(to_tensor(np.asarray(teacher_prompt_ids, np.int32)))
    if score_mask is not None:
        request.score_mask.CopyFrom(to_tensor(np.asarray(score_mask, np.uint8)))
    return stub.Score(request, timeout=120)


def test_teacher_tokenizer_sent_explicitly_is_bit_for_bit_the_same_path(stub):
    smol = T.load("smollm2")
    same = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True)), timeout=60
    )
    explicit = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(smol))), timeout=60
    )
    assert explicit.same_as_teacher and explicit.student_vocab_size == same.student_vocab_size
    tokens = smol("Q: 3 + 4?\nA: 3 + 4 = 7.", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    a, b = score(stub, same.session_id, tokens, 6), score(stub, explicit.session_id, tokens, 6)
    for field in ("ids", "logprobs", "token_logprobs", "mask", "reason"):
        assert getattr(a, field).data == getattr(b, field).data, field


def test_cross_tokenizer_session_over_grpc(stub, answers):
    need("gpt2")
    gpt2 = T.load("gpt2")
    opened = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(gpt2))), timeout=120
    )
    assert not opened.same_as_teacher and opened.student_vocab_size == len(gpt2)
    assert [(p.student_token, p.teacher_token) for p in opened.special_token_pairs] == [("<|endoftext|>", "<|im_end|>")]
    example = answers[1]
    tokens, score_from = rollout("gpt2", example)
    reply = score(stub, opened.session_id, tokens, score_from, messages=[("user", example["question"])])
    ids = from_tensor(reply.ids, name="ids", dtype="int32", ndim=2)
    mask = from_tensor(reply.mask, name="mask", dtype="uint8", ndim=1)
    assert ids.shape == (len(tokens) - score_from, 8) and ids.max() < len(gpt2)
    assert reply.counts.positions == len(mask) and reply.counts.with_distribution == int(mask.sum())
    assert reply.coverage >= MIN_COVERAGE and reply.counts.branch_sequences > 0
    stats = stub.GetSessionStats(teacher_pb2.GetSessionStatsRequest(session_id=opened.session_id), timeout=30)
    assert stats.requests == 1 and stats.totals.positions == reply.counts.positions
    assert stats.coverage == pytest.approx(reply.coverage) and stats.mean_retained_mass == pytest.approx(
        reply.mean_support_mass
    )
    # The student's own candidates (the target, a pad, a token across several teacher tokens) travel
    # and come back as the session computes them (testkit/candidate_check.py checks the values).
    positions = len(tokens) - score_from
    long_token = gpt2.convert_tokens_to_ids("Ġrepresentatives")
    candidates = np.stack([tokens[score_from:], np.full(positions, -1), np.full(positions, long_token)], axis=1)
    with_candidates = teacher_pb2.ScoreRequest(
        session_id=opened.session_id,
        tokens=to_tensor(np.asarray(tokens, dtype=np.int32)),
        score_from=score_from,
        top_k=8,
        candidate_ids=to_tensor(candidates.astype(np.int32)),
    )
    got = from_tensor(stub.Score(with_candidates, timeout=120).candidate_logprobs, name="c", dtype="float32", ndim=2)
    engine = teachers.smollm2_engine()
    local = teachers.cross("gpt2", "smollm2", engine).score(engine, tokens, score_from, 8, requested_ids=candidates)
    np.testing.assert_allclose(got, local.requested_logprobs, atol=1e-5)
    used = local.mask == 1
    assert np.isfinite(got[used][:, [0, 2]]).all() and np.isneginf(got[:, 1]).all() and np.isneginf(got[~used]).all()


@pytest.mark.parametrize(
    "payload, needle",
    [
        ("{}", "tokenizer"),
        (
            '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}',
            "WordLevel",
        ),
        (  # one token at id 40M: tables sized by the largest id would take gigabytes
            '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 40000000}, "unk_token": "a"}}',
            "largest id is 40000000",
        ),
        ('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}', "vocabulary is empty"),
    ],
)
def test_bad_student_tokenizer_is_invalid_argument_with_the_reason(stub, payload, needle):
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(
            teacher_pb2.OpenSessionRequest(
                tokenizer=teacher_pb2.StudentTokenizer(hf=teacher_pb2.HFTokenizer(tokenizer_json=payload))
            ),
            timeout=60,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in caught.value.details()


def test_chat_template_and_think_tokens_give_no_spurious_penalties(stub):
    """A ChatML student with <think> control tokens against SmolLM2 (which has no <think>).

    Masked: the think tokens (SPECIAL). Mapped: <|im_end|>, the student's EOS, onto the
    teacher's. Read as literal text instead, "<think>" costs the teacher's surprise at those
    characters, a penalty the student did nothing to earn.
    """
    need("gpt2")
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(T.load("gpt2").backend_tokenizer.to_str())
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    student = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=specials,
        chat_template=template,
    )
    messages = [("user", "What is 12 + 30?")]
    prompt = student.apply_chat_template([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
    prompt = list(prompt["input_ids"]) if isinstance(prompt, dict) or hasattr(prompt, "keys") else list(prompt)
    completion = student("<think>\n12 + 30 = 42\n</think>\nThe answer is 42.<|im_end|>", add_special_tokens=False)[
        "input_ids"
    ]
    tokens = prompt + completion
    think = {student.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}

    def session(pairs=()):
        request = teacher_pb2.OpenSessionRequest(
            tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(student)),
            special_token_pairs=[teacher_pb2.SpecialTokenPair(student_token=a, teacher_token=b) for a, b in pairs],
        )
        return stub.OpenSession(request, timeout=120).session_id

    reply = score(stub, session(), tokens, len(prompt), messages=messages)
    mask = from_tensor(reply.mask, name="mask", dtype="uint8", ndim=1)
    reason = from_tensor(reply.reason, name="reason", dtype="uint8", ndim=1)
    token_lp = from_tensor(reply.token_logprobs, name="token_logprobs", dtype="float32", ndim=1)
    ids = from_tensor(reply.ids, name="ids", dtype="int32", ndim=2)
    targets = np.asarray(completion)
    is_think = np.isin(targets, list(think))
    # Masked: the think tokens, and the token right after each (the teacher reads the text
    # around a removed <think> run together, "assistant\n\n12").
    masked = is_think | np.concatenate([[False], is_think[:-1]])
    assert (mask[masked] == 0).all() and (reason[masked] == teacher_pb2.MASK_REASON_SPECIAL).all()
    assert mask[~masked].all(), "everything else, the EOS included, stays in the loss"
    assert not set(ids[ids >= 0].tolist()) & (think | {student.convert_tokens_to_ids("<|im_start|>")})
    eos_lp = float(token_lp[-1])
    print(
        f"\nthink tokens masked; token log-probs of the kept positions: min {token_lp[mask == 1].min():.2f}, "
        f"EOS {eos_lp:.2f}"
    )
    assert token_lp[mask == 1].min() > -12.0
    # The same rollout with <think> read as text by the teacher: a large penalty at that position.
    literal = score(
        stub, session(pairs=[("<think>", "<think>"), ("</think>", "</think>")]), tokens, len(prompt), messages=messages
    )
    literal_lp = from_tensor(literal.token_logprobs, name="token_logprobs", dtype="float32", ndim=1)
    print(
        f"<think> read as text: token log-prob {literal_lp[0]:.2f} at <think>, {literal_lp[is_think].min():.2f} worst"
    )
    assert literal_lp[is_think].min() < token_lp[mask == 1].min() - 2.0


def test_oversized_rollouts_and_messages_are_refused_before_any_work(stub):
    need("gpt2")
    gpt2 = T.load("gpt2")
    opened = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(gpt2))), timeout=120
    )
    # Default limit: 65,536 tokens per request. The student's rollout is checked as sent (a
    # cross-tokenizer alignment of 200k tokens would take many seconds and gigabytes).
    tokens = np.full(200_000, gpt2("hello")["input_ids"][0])
    for messages in ((), [("user", "")] * 70_000, [("user", "word " * 120_000)]):
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as caught:
            score(stub, opened.session_id, tokens if not messages else tokens[:100], 10, messages=messages)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over this teacher's limit" in caught.value.details()
        assert time.perf_counter() - started < 5.0  # the 200k-token request is 0.8 MB on the wire
    # Options at their maxima multiply each position's work 36 times: 3,000 positions are too many.
    widest = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(
            tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(gpt2)),
            alignment=teacher_pb2.AlignmentOptions(
                candidates=1024, inside_candidates=1024, expansion_rounds=8, branch_token_factor=8.0
            ),
        ),
        timeout=120,
    )
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        score(stub, widest.session_id, tokens[:3000], 10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "36.0 times" in caught.value.details()
    assert time.perf_counter() - started < 1.0


def test_the_teacher_reads_its_own_prompt_in_both_session_kinds(stub):
    """messages (the teacher's chat template) or teacher_prompt_ids replace the student's prompt for
    the teacher: a same-tokenizer session scores the completion exactly as if the rollout had been
    sent with that prompt, a cross-tokenizer one as if the messages had been sent; a privileged
    hint raises the teacher's log-probability of the answer it gives away."""
    need("gpt2")
    smol, gpt2 = T.load("smollm2"), T.load("gpt2")
    question = "What is 37 times 41? Reply with the number."
    hint = [("system", "The answer to the user's question is 1517."), ("user", question)]
    rendered = smol.apply_chat_template([{"role": r, "content": c} for r, c in hint], add_generation_prompt=True)
    rendered = list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)
    completion = smol("The answer is 1517.", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    plain = smol(question, add_special_tokens=False)["input_ids"]  # what the student was prompted with
    same = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True)), timeout=60
    ).session_id

    def arrays(reply):
        return [from_tensor(getattr(reply, f), name=f) for f in ("ids", "logprobs", "token_logprobs", "mask")]

    direct = arrays(score(stub, same, rendered + completion, len(rendered)))
    for prompt in (dict(messages=hint), dict(teacher_prompt_ids=rendered)):
        got = arrays(score(stub, same, plain + completion, len(plain), **prompt))
        assert np.array_equal(got[0], direct[0]) and np.array_equal(got[3], direct[3]), prompt.keys()
        np.testing.assert_allclose(got[1], direct[1], atol=1e-5)
        np.testing.assert_allclose(got[2], direct[2], atol=1e-5)
    unhinted = arrays(score(stub, same, plain + completion, len(plain), messages=[("user", question)]))
    gain = float(direct[2].sum() - unhinted[2].sum())
    print(f"\nhint: the teacher's log-probability of the completion rises by {gain:.2f} nats")
    assert gain > 1.0

    cross = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(gpt2))), timeout=120
    ).session_id
    student_plain = gpt2(question)["input_ids"]
    student_tokens = student_plain + gpt2("The answer is 1517.")["input_ids"] + [gpt2.eos_token_id]
    by_messages = arrays(score(stub, cross, student_tokens, len(student_plain), messages=hint))
    by_ids = arrays(score(stub, cross, student_tokens, len(student_plain), teacher_prompt_ids=rendered))
    assert np.array_equal(by_messages[0], by_ids[0]) and np.array_equal(by_messages[3], by_ids[3])
    np.testing.assert_allclose(by_messages[2], by_ids[2], atol=1e-5)
    assert by_ids[3].all()
    # Where a GPT-2 token spans exactly one SmolLM2 token (same bytes, same boundaries), its value is
    # the teacher's own forward over its rendering of the hinted prompt (the same-tokenizer `direct`).
    student_spans = token_spans(gpt2, student_tokens[len(student_plain) : -1])
    teacher_spans = token_spans(smol, completion[:-1])
    shared = [(s, teacher_spans.index(span)) for s, span in enumerate(student_spans) if span in teacher_spans]
    shared.append((len(student_spans), len(teacher_spans)))  # EOS, paired
    assert len(shared) >= 4, (student_spans, teacher_spans)
    gaps = [abs(by_messages[2][s] - direct[2][t]) for s, t in shared]
    print(f"cross: {len(shared)} of {len(student_spans) + 1} positions on shared boundaries, max |gap| {max(gaps):.2e}")
    assert max(gaps) < 1e-4


def token_spans(tokenizer, ids) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token of `ids` in their decoded text."""
    spans, end = [], 0
    for count in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:count]))
        spans.append((end, length))
        end = length
    return spans


@pytest.mark.parametrize(
    "prompt, needle",
    [
        (dict(messages=[("user", "hi")], teacher_prompt_ids=[1, 2]), "not both"),
        (dict(teacher_prompt_ids=[5, 10**6]), "outside the teacher's vocabulary"),
        (dict(teacher_prompt_ids=[-1]), "outside the teacher's vocabulary"),
        (dict(teacher_prompt_ids=[]), "non-empty"),
        (dict(teacher_prompt_ids=[5] * 9000), "context holds"),
    ],
)
def test_bad_teacher_prompts_are_refused(stub, prompt, needle):
    same = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True)), timeout=60
    ).session_id
    with pytest.raises(grpc.RpcError) as caught:
        score(stub, same, [5, 6, 7, 8], 2, **prompt)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in caught.value.details()


def test_context_positions_of_another_tokenizer_are_read_not_scored(stub):
    """A two-turn rollout of a GPT-2 student with a tool's output between its turns: the output's
    positions come back CONTEXT, without support and without branch work; the student's own
    positions keep their values."""
    need("gpt2")
    gpt2 = T.load("gpt2")
    session = stub.OpenSession(
        teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(hf=hf_message(gpt2))), timeout=120
    ).session_id
    prompt = gpt2("What is 4817 times 12? Use the calculator.")["input_ids"]
    turns = [" calculator(4817 * 12)", "\nresult: 57804\n", " So the answer is 57804."]
    pieces = [gpt2(text)["input_ids"] for text in turns]
    completion = [token for piece in pieces for token in piece] + [gpt2.eos_token_id]
    score_mask = np.concatenate([np.ones(len(pieces[0])), np.zeros(len(pieces[1])), np.ones(len(pieces[2]) + 1)])
    plain = score(stub, session, prompt + completion, len(prompt))
    masked = score(stub, session, prompt + completion, len(prompt), score_mask=score_mask)
    own, context = score_mask == 1, score_mask == 0
    a = [from_tensor(getattr(plain, f), name=f) for f in ("ids", "logprobs", "token_logprobs", "reason")]
    b = [from_tensor(getattr(masked, f), name=f) for f in ("ids", "logprobs", "token_logprobs", "reason")]
    # The leading entries and the target's value; deeper entries depend on which paths the branch
    # budget (spread over the positions scored) expanded.
    assert np.array_equal(b[0][own][:, :4], a[0][own][:, :4]) and np.array_equal(b[3][own], a[3][own])
    np.testing.assert_allclose(b[1][own][:, :4], a[1][own][:, :4], atol=1e-5)
    np.testing.assert_allclose(b[2][own], a[2][own], atol=1e-5)
    assert (b[3][context] == teacher_pb2.MASK_REASON_CONTEXT).all() and (b[0][context] == -1).all()
    assert masked.counts.context == int(context.sum()) and masked.counts.with_distribution == int(own.sum())
    assert masked.counts.branch_tokens <= plain.counts.branch_tokens
