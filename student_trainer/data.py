"""Prompts: read a JSONL file, tokenize once, hand out batches in a reproducible order.

The order is a seeded permutation per epoch and the only state is the number of
prompts handed out, so a resumed run continues with exactly the next prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Prompt:
    """One prompt: the student's token ids, the chat messages they were rendered from (empty for a
    text prompt), a privileged prompt for the teacher only (empty: none) and the hosted teacher
    that scores its rollouts ("": the server's default)."""

    ids: list[int]
    messages: Messages = ()
    teacher_messages: Messages = ()
    teacher: str = ""

    def for_teacher(self, chat: bool) -> Messages:
        """The messages the teacher renders with its own chat template: the privileged ones, else
        (with `chat`) the student's; empty: the teacher reads the student's tokens."""
        return self.teacher_messages or (self.messages if chat else ())


def _messages(value, where: str, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: '{field}' must be a non-empty list of {{'role', 'content'}} objects")
    try:
        return tuple((str(m["role"]), str(m["content"])) for m in value)
    except (KeyError, TypeError):
        raise ValueError(f"{where}: every message of '{field}' needs a 'role' and a 'content'") from None


def load_prompts(path: str | Path, tokenizer) -> list[Prompt]:
    """Every prompt line: {"prompt": text} or {"messages": [{"role", "content"}, ...]}, and optionally
    {"teacher_messages": [...]}: a privileged prompt the teacher reads instead (a hint, a reference
    solution, a system prompt the student never sees), and {"teacher": NAME}: the teacher (of the
    several a server hosts) that scores it. The student reads a text prompt tokenized, messages in
    its own chat template."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = json.loads(line)
        messages: Messages = ()
        if "messages" in record:
            messages = _messages(record["messages"], where, "messages")
            chat = [{"role": role, "content": content} for role, content in messages]
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif "prompt" in record:
            ids = tokenizer(record["prompt"])["input_ids"]
        else:
            raise ValueError(f"{where}: a prompt line needs a 'prompt' or a 'messages' field")
        teacher = (
            _messages(record["teacher_messages"], where, "teacher_messages") if "teacher_messages" in record else ()
        )
        name = record.get("teacher", "")
        if not isinstance(name, str):
            raise ValueError(f"{where}: 'teacher' must be a teacher's name (GetInfo.teachers), got {name!r}")
        prompts.append(Prompt(list(ids), messages, teacher, name))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptStream:
    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = position  # prompts handed out so far, over all epochs

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        for _ in range(size):
            epoch, index = divmod(self.position, len(self.prompts))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            batch.append(self.prompts[order[index]])
            self.position += 1
        return batch
