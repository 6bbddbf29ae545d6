"""VllmRollouts (student_trainer/vllm_rollouts.py) against the Hugging Face model, in process.

The tests import vllm, so they run under the vLLM environment (.venv-vllm); elsewhere they skip:

    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/student_trainer/test_vllm_rollouts.py -k inprocess -s

Two tiny Llamas (head_dim 32, float32): one with an untied lm_head, one with lm_head tied to
embed_tokens (vLLM skips lm_head.weight when loading those, and its CPU kernels keep a packed copy
of the head). The reference for every vLLM log-prob is the HF model's float32
log_softmax(logits) of the same tokens, teacher-forced on prompt + completion.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from testkit.tiny_model import TINY_VOCAB, build_tiny_model

pytestmark = pytest.mark.vllm

inprocess = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not importable in this Python: in-process vLLM tests run under .venv-vllm "
    "(.ci/run does: .venv-vllm/bin/python -m pytest tests/student_trainer/test_vllm_rollouts.py -k inprocess)",
)

TOL = 1e-3  # max |vLLM sampling log-prob - HF recomputed log-prob|
EOS = 2
# The tied engine stops on more ids, so that its rollouts end at an EOS often enough to test it.
TIED_EOS = [EOS, *range(40, 50)]
MAX_LEN = 256  # the tiny models' max_position_embeddings
PROMPT_LEN = 140  # beyond vLLM's CPU block size (128): prompts fill a prefix-cache block


@dataclass
class Engine:
    rollouts: object  # VllmRollouts
    hf: torch.nn.Module  # the HF model holding the weights the engine has now
    eos_ids: list[int]


def build_tied_model(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    build_tiny_model(path, seed=2)  # for its tokenizer and config
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper logits, as build_tiny_model does to its untied head
        model.model.embed_tokens.weight.mul_(5.0)
    model.save_pretrained(path)
    return path


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def start(path: Path, eos_ids: list[int]) -> Engine:
    from student_trainer.vllm_rollouts import VllmRollouts

    return Engine(VllmRollouts(str(path), eos_ids=eos_ids, max_model_len=MAX_LEN), load_hf(path), eos_ids)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    untied = build_tiny_model(tmp_path_factory.mktemp("vllm-student"), seed=1)
    tied = build_tied_model(tmp_path_factory.mktemp("vllm-student-tied"))
    set_num_threads = torch.set_num_threads
    started = {"untied": start(untied, [EOS]), "tied": start(tied, TIED_EOS)}
    assert torch.set_num_threads is set_num_threads  # vLLM's CPU worker replaces it; VllmRollouts restores it
    hf = started["tied"].hf
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    yield started
    for engine in started.values():
        engine.rollouts.close()


def random_prompts(count: int, seed: int, length: int = PROMPT_LEN) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, TINY_VOCAB, (length + i,), generator=generator).tolist() for i in range(count)]


@torch.no_grad()
def hf_logprobs(model, rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the completion tokens, argmax ids) from the HF model, teacher-forced."""
    logits = model(torch.tensor([rollout.tokens])).logits[0, rollout.prompt_length - 1 : -1].float()
    completion = torch.tensor(rollout.tokens[rollout.prompt_length :])
    return logits.log_softmax(-1).gather(1, completion[:, None])[:, 0], logits.argmax(-1)


def max_diff(model, rollouts) -> float:
    worst = 0.0
    for rollout in rollouts:
        assert rollout.logprobs is not None and len(rollout.logprobs) == rollout.completion_length
        reference, _ = hf_logprobs(model, rollout)
        worst = max(worst, (reference - torch.tensor(rollout.logprobs)).abs().max().item())
    return worst


def trained_copy(model) -> torch.nn.Module:
    """A few AdamW steps of next-token loss on random sequences: weights a trainer would push."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(11)
    for _ in range(3):
        batch = torch.randint(4, TINY_VOCAB, (4, 32), generator=generator)
        trained(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return trained.eval()


@inprocess
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_inprocess_pushed_weights_are_the_trained_ones(engines, kind):
    engine = engines[kind]
    base, trained = engine.hf, trained_copy(engine.hf)
    prompts, seeds = random_prompts(6, seed=3), list(range(100, 106))
    sample = {"top_p": 0.95, "temperature": 1.0, "max_new_tokens": 40}

    # Before the push vLLM still samples with the old weights: it agrees with the base model only.
    before = engine.rollouts.generate(prompts, seeds, **sample)
    assert sum(r.completion_length for r in before) >= 30
    old_vs_base, old_vs_trained = max_diff(base, before), max_diff(trained, before)

    engine.rollouts.push_weights(trained.state_dict().items())
    engine.hf = trained
    # The same prompts again: their first block is in the prefix cache, computed with the old weights.
    after = engine.rollouts.generate(prompts, seeds, **sample)
    new_vs_trained = max_diff(trained, after)

    # And back: pushing the base weights restores the base model's log-probs.
    engine.rollouts.push_weights(base.state_dict().items())
    engine.hf = base
    restored_vs_base = max_diff(base, engine.rollouts.generate(prompts, seeds, **sample))

    print(
        f"\n[vllm rollouts, {kind}] max |vLLM - HF| log-prob: before the push vs base {old_vs_base:.2e}, "
        f"vs trained {old_vs_trained:.2e}; after the push vs trained {new_vs_trained:.2e}; "
        f"after pushing the base back {restored_vs_base:.2e}"
    )
    assert old_vs_base <= TOL and new_vs_trained <= TOL and restored_vs_base <= TOL
    assert old_vs_trained > 50 * TOL, "the trained weights barely differ from the base: the test proves nothing"


@inprocess
def test_inprocess_rollouts_depend_on_prompt_and_seed_only_and_sampling_options_pass_through(engines):
    engine = engines["untied"]
    rollouts = engine.rollouts
    a, b, c = random_prompts(3, seed=5, length=20)
    sample = {"top_p": 0.9, "temperature": 1.0, "max_new_tokens": 40}

    together = rollouts.generate([a, b, c], [1, 2, 3], **sample)
    alone = rollouts.generate([b], [2], **sample)[0]
    reordered = rollouts.generate([c, b], [3, 2], **sample)
    assert [r.tokens[: r.prompt_length] for r in together] == [a, b, c]  # output order = input order
    assert together[1].tokens == alone.tokens == reordered[1].tokens
    assert together[2].tokens == reordered[0].tokens
    batch_diff = max(abs(x - y) for r in (together[1], reordered[1]) for x, y in zip(r.logprobs, alone.logprobs))
    print(f"\n[vllm rollouts] same prompt and seed in other batches: max log-prob difference {batch_diff:.2e}")
    assert batch_diff <= 1e-5
    assert rollouts.generate([b], [7], **sample)[0].tokens != alone.tokens  # another seed, another rollout

    # top_p -> 0 keeps only the most likely token: greedy, whatever the seed.
    greedy = rollouts.generate([a, b], [4, 5], top_p=1e-6, temperature=1.0, max_new_tokens=30)
    for rollout in greedy:
        _, argmax = hf_logprobs(engine.hf, rollout)
        assert rollout.tokens[rollout.prompt_length :] == argmax.tolist()

    # The temperature reaches the sampler, and the log-probs stay those of the raw logits.
    prompts, seeds = random_prompts(8, seed=6, length=20), list(range(8))
    cold = rollouts.generate(prompts, seeds, top_p=1.0, temperature=0.3, max_new_tokens=30)
    hot = rollouts.generate(prompts, seeds, top_p=1.0, temperature=2.0, max_new_tokens=30)
    mean = [sum(sum(r.logprobs) for r in rs) / sum(r.completion_length for r in rs) for rs in (cold, hot)]
    cold_diff, hot_diff = max_diff(engine.hf, cold), max_diff(engine.hf, hot)
    print(
        f"[vllm rollouts] mean raw log-prob of sampled tokens: temperature 0.3 {mean[0]:.3f}, 2.0 {mean[1]:.3f}; "
        f"max |vLLM - HF| {cold_diff:.2e}, {hot_diff:.2e}"
    )
    assert mean[0] > mean[1] + 1.0
    assert cold_diff <= TOL and hot_diff <= TOL  # raw log_softmax (temperature 1), not the sampling one


@inprocess
def test_inprocess_candidates_are_the_models_top_ids(engines):
    """vLLM's top-M at each completion position equals the HF model's top-M of the same logits
    (rows where two of the top M+1 logits are within float noise of each other are skipped), and
    recording them changes no sample."""
    engine = engines["untied"]
    prompts, seeds = random_prompts(6, seed=9, length=20), list(range(6))
    sample = {"top_p": 0.9, "temperature": 1.0, "max_new_tokens": 20}
    plain = engine.rollouts.generate(prompts, seeds, **sample)
    rollouts = engine.rollouts.generate(prompts, seeds, **sample, candidates=5)
    assert [r.tokens for r in rollouts] == [r.tokens for r in plain]
    compared = 0
    for rollout in rollouts:
        assert rollout.candidate_ids.shape == (rollout.completion_length, 5)
        with torch.no_grad():
            logits = engine.hf(torch.tensor([rollout.tokens])).logits[0, rollout.prompt_length - 1 : -1].float()
        top = logits.topk(6, dim=-1)
        clear = (top.values[:, :-1] - top.values[:, 1:]).min(-1).values > 1e-3
        assert torch.equal(torch.from_numpy(rollout.candidate_ids).long()[clear], top.indices[clear, :5])
        compared += int(clear.sum())
    assert compared >= 30


@inprocess
def test_inprocess_rollouts_stop_at_eos_and_keep_it(engines):
    engine = engines["tied"]
    prompts = random_prompts(16, seed=8, length=10)
    rollouts = engine.rollouts.generate(prompts, list(range(16)), top_p=1.0, temperature=1.0, max_new_tokens=12)
    stopped = 0
    for prompt, rollout in zip(prompts, rollouts):
        completion = rollout.tokens[rollout.prompt_length :]
        assert rollout.tokens[: rollout.prompt_length] == prompt
        assert 1 <= len(completion) <= 12 and len(rollout.logprobs) == len(completion)
        # An EOS ends the completion and stays in it; without one the completion is cut at max_new_tokens.
        assert not set(completion[:-1]) & set(engine.eos_ids)
        if completion[-1] in engine.eos_ids:
            stopped += 1
        else:
            assert len(completion) == 12
    print(f"\n[vllm rollouts] {stopped} of {len(rollouts)} rollouts stopped at an EOS")
    assert 0 < stopped < len(rollouts)  # both endings happen

    (one,) = engine.rollouts.generate(prompts[:1], [0], top_p=1.0, temperature=1.0, max_new_tokens=1)
    assert one.completion_length == 1 and len(one.logprobs) == 1
