"""Sample rollouts from the student with top-p, one seed per rollout.

Every rollout has its own random stream, seeded from (run seed, step, index of
the rollout in the step's global batch). A rollout therefore depends only on its
prompt, its seed and the weights, not on which other prompts share its batch or
its process: a 2-process data-parallel run samples the same rollouts as one
process with the same global batch, and a vLLM rollout engine given the same
seeds samples from the same distribution.

The Hugging Face path runs `model.generate` greedily with `RowSampler` as the
only logits processor: it draws the sample itself (temperature, top-p, one
generator per row) and leaves only that token possible, so greedy decoding
picks it. `generate` keeps its KV cache and padding logic; the randomness is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass(frozen=True)
class Rollout:
    tokens: list[int]  # prompt followed by the completion (ending with EOS unless cut by max_new_tokens)
    prompt_length: int
    # Per completion token: the sampling engine's log-probability of it under the raw logits
    # (temperature 1, before top-p), the quantity the trainer recomputes. None if not recorded.
    logprobs: list[float] | None = None
    # int32 [completion_length, M]: the student's top-M ids under the raw logits at each completion
    # position (the candidates the teacher scores for the union support); None if not asked for.
    candidate_ids: np.ndarray | None = None
    # uint8 [completion_length]: 0 where the token is context the student did not write (a tool's
    # output in a multi-turn rollout): the teacher masks it CONTEXT, so it carries no loss. None: all the student's.
    score_mask: np.ndarray | None = None
    turns: int = 1  # the student's turns (environments.py)
    reward: float | None = None  # the environment's, at the end of the episode

    @property
    def completion_length(self) -> int:
        return len(self.tokens) - self.prompt_length


class RolloutEngine(Protocol):
    """What samples the rollouts: `HfRollouts` (train.py) on the live model, or `VllmRollouts`
    (vllm_rollouts.py) on a copy of the weights that the trainer pushes."""

    name: str

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        top_p: float,
        temperature: float,
        max_new_tokens: int,
        candidates: int = 0,
    ) -> list[Rollout]:
        """One rollout per prompt; `candidates` > 0: each also records the student's top-M ids."""

    def push_weights(self, weights) -> None:
        """Sample with these weights from now on: (name, tensor) pairs under Hugging Face names."""

    def close(self) -> None: ...


def rollout_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of rollouts first .. first+count-1 of `step`'s global batch (31-bit, for every engine)."""
    return [
        int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0] >> 1)
        for index in range(first, first + count)
    ]


class RowSampler(LogitsProcessor):
    """Top-p sampling with one torch.Generator per row; records the raw log-prob of each pick, and
    the top `candidates` ids of the raw logits (from the row the step computes anyway)."""

    def __init__(self, seeds: list[int], top_p: float, temperature: float, candidates: int = 0) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.top_p = top_p
        self.temperature = temperature
        self.candidates = candidates
        self.logprobs: list[list[float]] = [[] for _ in seeds]
        self.top_ids: list[torch.Tensor] = []  # per step: int32 [rows, candidates]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        probs, order = (logits / self.temperature).softmax(-1).sort(dim=-1, descending=True)
        # Nucleus: keep a token while the mass ranked above it is below top_p (the first always stays).
        probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)
        # One uniform draw per row and step from the row's own generator, then the inverse CDF.
        uniform = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(probs.device)
        cumulative = probs.cumsum(-1)
        rank = (cumulative < uniform[:, None] * cumulative[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)
        choice = order.gather(1, rank[:, None])
        raw_logprobs = logits.log_softmax(-1).gather(1, choice)[:, 0].tolist()
        for row, logprob in enumerate(raw_logprobs):
            self.logprobs[row].append(logprob)
        if self.candidates:
            self.top_ids.append(logits.topk(self.candidates, dim=-1).indices.to(torch.int32).cpu())
        only_choice = torch.full_like(scores, float("-inf"))
        return only_choice.scatter_(1, choice, 0.0)


@torch.no_grad()
def generate_rollouts(
    model,
    prompts: list[list[int]],
    *,
    seeds: list[int],
    eos_ids: list[int],
    pad_id: int,
    top_p: float,
    temperature: float,
    max_new_tokens: int,
    synced_processes: bool = False,
    candidates: int = 0,
) -> list[Rollout]:
    """Sample one completion per prompt, prompt i with seeds[i]; `candidates`: record the top-M ids.

    `synced_processes`: keep decoding until every process of the group is done (FSDP: each
    decoding step gathers parameters collectively, so all ranks must take the same steps).
    """
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    # Left padding: every prompt ends at the same column, where generation starts.
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    sampler = RowSampler(seeds, top_p, temperature, candidates)
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=False,  # RowSampler has already drawn the token: greedy takes it
        logits_processor=LogitsProcessorList([sampler]),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        synced_gpus=synced_processes,
    )
    model.train(was_training)
    top_ids = torch.stack(sampler.top_ids, dim=1).numpy() if candidates else None  # [rows, steps, M]
    rollouts = []
    for index, (prompt, row, logprobs) in enumerate(zip(prompts, output[:, width:].tolist(), sampler.logprobs)):
        completion = []
        for token in row:
            completion.append(token)
            if token in eos_ids:
                break
        candidate_ids = None if top_ids is None else top_ids[index, : len(completion)]
        rollouts.append(Rollout(list(prompt) + completion, len(prompt), logprobs[: len(completion)], candidate_ids))
    return rollouts


class HfRollouts:
    """The default rollout engine: `generate` on the model being trained (no policy lag)."""

    name = "hf"

    def __init__(self, model, *, eos_ids: list[int], pad_id: int, synced_processes: bool = False) -> None:
        self.model, self.eos_ids, self.pad_id, self.synced_processes = model, eos_ids, pad_id, synced_processes

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        top_p: float,
        temperature: float,
        max_new_tokens: int,
        candidates: int = 0,
    ) -> list[Rollout]:
        return generate_rollouts(
            self.model,
            prompts,
            seeds=seeds,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            top_p=top_p,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            synced_processes=self.synced_processes,
            candidates=candidates,
        )

    def push_weights(self, weights) -> None:
        """Nothing to copy: it samples with the live model."""

    def close(self) -> None:
        """Nothing to release."""
