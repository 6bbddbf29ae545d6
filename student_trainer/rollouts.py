"""Sample rollouts from the student with top-p, prompt by prompt in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollout:
    tokens: list[int]  # prompt followed by the completion (ending with EOS unless cut by max_new_tokens)
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.tokens) - self.prompt_length


@torch.no_grad()
def generate_rollouts(
    model,
    prompts: list[list[int]],
    *,
    eos_ids: list[int],
    pad_id: int,
    top_p: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> list[Rollout]:
    """Sample one completion per prompt. `seed` makes the step reproducible on resume."""
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    # Left padding: every prompt ends at the same column, where generation starts.
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=True,
        top_p=top_p,
        top_k=0,  # transformers samples from the top 50 by default; only top-p here
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    model.train(was_training)
    rollouts = []
    for prompt, row in zip(prompts, output[:, width:].tolist()):
        completion = []
        for token in row:
            completion.append(token)
            if token in eos_ids:
                break
        rollouts.append(Rollout(tokens=list(prompt) + completion, prompt_length=len(prompt)))
    return rollouts
