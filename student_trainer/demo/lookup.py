"""The tool task of the demo (`opd-demo --task tool`): answer with a value only a tool knows.

A user names a 3-digit key; its value is 3 digits drawn from a hash of the key, which no
model can compute. The solved episode takes two turns:

    user: 123      assistant: ?123      tool: 807      assistant: 807

The first turn calls the lookup tool with a key ("?" then the key), the tool answers with
that key's value, and the second turn repeats it; an episode whose first turn is not a call
ends there, rewarded 1 only if it guessed the value. A character-level tokenizer with a
chat template renders the turns (<bos>, <eos> and <tool> are its specials):

    <bos>123>?123<eos><tool>807>807<eos>

Held-out keys (a hash of the key picks them) are never trained on, so an episode on one
succeeds only by calling the tool and copying its answer.

The hint task (`opd-demo --task hint`) distills the lookup into the student: it answers in
one turn, without the tool, and its teacher (a frozen copy of its own starting weights)
reads `looked_up(key)` as its privileged context, so it scores the student's answer having
seen the tool's.
"""

from __future__ import annotations

import hashlib

import transformers

from student_trainer.data import Prompt
from student_trainer.demo.chars import character_tokenizer
from student_trainer.environments import EpisodeEnd, Observation

KEY_DIGITS = 3
SEPARATOR, CALL = ">", "?"
PAD, BOS, EOS, TOOL = "<pad>", "<bos>", "<eos>", "<tool>"
VOCAB = [PAD, BOS, EOS, TOOL, *"0123456789", SEPARATOR, CALL]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<bos>{{ m['content'] }}>"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}<eos>"
    "{% else %}<tool>{{ m['content'] }}>{% endif %}"
    "{% endfor %}"
)
HELDOUT_BUCKETS = 20  # of 100: 200 or so of the 1,000 keys


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character; a user turn ends with '>' and opens the assistant's."""
    return character_tokenizer(VOCAB, (PAD, BOS, EOS, TOOL), add_bos=False, chat_template=CHAT_TEMPLATE)


def _digest(key: str) -> bytes:
    return hashlib.sha256(f"lookup:{key}".encode()).digest()


def value_of(key: str) -> str:
    return f"{int.from_bytes(_digest(key)[:4], 'little') % 10**KEY_DIGITS:0{KEY_DIGITS}d}"


def keys(split: str) -> list[str]:
    """Every key of `split` ("train" or "heldout"), in order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    every = (f"{n:0{KEY_DIGITS}d}" for n in range(10**KEY_DIGITS))
    return [key for key in every if (_digest(key)[4] % 100 < HELDOUT_BUCKETS) == (split == "heldout")]


def question(key: str) -> list[dict]:
    return [{"role": "user", "content": key}]


def looked_up(key: str) -> list[dict]:
    """The question, the call and the tool's answer: what a tool user knows before it answers."""
    return [*question(key), {"role": "assistant", "content": CALL + key}, {"role": "tool", "content": value_of(key)}]


def solved(key: str) -> list[dict]:
    """The episode a tool user has: the call, the tool's answer, the answer."""
    return [*looked_up(key), {"role": "assistant", "content": value_of(key)}]


class LookupTool:
    """The environment (student_trainer.environments.Environment) of the task."""

    def start(self, prompt: Prompt) -> LookupEpisode:
        return LookupEpisode(prompt.messages[-1][1])


class LookupEpisode:
    def __init__(self, key: str) -> None:
        self.key = key
        self.called = False

    def respond(self, turn: str) -> Observation | EpisodeEnd:
        called = turn.removeprefix(CALL)
        if not self.called and turn.startswith(CALL) and len(called) == KEY_DIGITS and called.isdigit():
            self.called = True
            return Observation(value_of(called), role="tool")
        return EpisodeEnd(reward=float(turn == value_of(self.key)))
