"""Prompts: read a JSONL file, tokenize once, hand out batches in a reproducible order.

The order is a seeded permutation per epoch and the only state is the number of
prompts handed out, so a resumed run continues with exactly the next prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of every prompt: {"prompt": text} or {"messages": [{"role", "content"}, ...]}."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "messages" in record:
            ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif "prompt" in record:
            ids = tokenizer(record["prompt"])["input_ids"]
        else:
            raise ValueError(f"{path}:{number}: a prompt line needs a 'prompt' or a 'messages' field")
        prompts.append(list(ids))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptStream:
    def __init__(self, prompts: list[list[int]], seed: int, position: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = position  # prompts handed out so far, over all epochs

    def next_batch(self, size: int) -> list[list[int]]:
        batch = []
        for _ in range(size):
            epoch, index = divmod(self.position, len(self.prompts))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            batch.append(self.prompts[order[index]])
            self.position += 1
        return batch
