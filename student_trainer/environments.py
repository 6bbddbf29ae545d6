"""Multi-turn rollouts: the student takes a turn, an environment answers, until the episode ends.

An `Environment` starts one `Episode` per prompt. The episode reads each student turn as
text and answers with an `Observation` (a tool's output or a user's reply) or with the
`EpisodeEnd`, which may carry a reward. The rollout is one token sequence: the prompt,
then the student's turns interleaved with the observations, each observation rendered
with the student's own chat template (in the role it names), so the student reads it as
it will in use. Observation tokens, and the template's glue around them, are context:
their score mask is 0, so the teacher masks them CONTEXT and they carry no loss, and
their behaviour log-probabilities are NaN (the student did not sample them).

Limits: `max_turns` student turns, `max_new_tokens` per turn, `max_rollout_tokens` for the
whole completion (turns and observations); an observation that would cross the last ends
the episode before it. `mask_observations` False is the ablation that leaves observations
in the teacher's scoring and in the loss. Turn t of the rollout with seed s samples with seed s for t = 0 (a
one-turn episode samples exactly what a single-turn rollout would) and a seed derived
from (s, t) after it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from student_trainer.data import Prompt
from student_trainer.rollouts import Rollout, RolloutEngine


@dataclass(frozen=True)
class Observation:
    content: str
    role: str = "tool"  # the chat role the student's template renders it in


@dataclass(frozen=True)
class EpisodeEnd:
    reward: float | None = None


class Episode(Protocol):
    def respond(self, turn: str) -> Observation | EpisodeEnd:
        """The answer to the student's turn (its text, special tokens removed)."""


class Environment(Protocol):
    def start(self, prompt: Prompt) -> Episode:
        """A new episode for this prompt (its messages are the conversation so far)."""


@dataclass(frozen=True)
class EpisodeOptions:
    max_turns: int
    max_new_tokens: int  # per student turn
    max_rollout_tokens: int  # the whole completion: turns and observations
    # False (an ablation): observations are scored and trained on as if the student wrote them.
    mask_observations: bool = True


def load_environment(spec: str) -> Environment:
    """`module:callable`, called with no arguments (TrainConfig.environment)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"environment must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module_name), name)()


@dataclass
class _Conversation:
    """One episode in progress: what has been said, and the rollout's arrays so far."""

    prompt: Prompt
    episode: Episode
    seed: int
    messages: list[dict]
    tokens: list[int]
    score_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    candidate_rows: list[np.ndarray] = field(default_factory=list)
    turns: int = 0
    reward: float | None = None
    done: bool = False

    @property
    def completion_length(self) -> int:
        return len(self.tokens) - len(self.prompt.ids)


def turn_seed(seed: int, turn: int) -> int:
    if turn == 0:
        return seed
    return int(np.random.SeedSequence([seed, turn]).generate_state(1)[0] >> 1)


def sample_episodes(
    engine: RolloutEngine,
    prompts: list[Prompt],
    seeds: list[int],
    environment: Environment,
    tokenizer,
    options: EpisodeOptions,
    *,
    top_p: float,
    temperature: float,
    candidates: int = 0,
) -> list[Rollout]:
    """One multi-turn rollout per prompt, the turns of all episodes sampled together."""
    for prompt in prompts:
        if not prompt.messages:
            raise ValueError("a multi-turn environment needs chat prompts: prompt lines with 'messages'")
    conversations = [
        _Conversation(p, environment.start(p), seed, [{"role": r, "content": c} for r, c in p.messages], list(p.ids))
        for p, seed in zip(prompts, seeds)
    ]
    for turn in range(options.max_turns):
        active = [c for c in conversations if not c.done]
        if not active:
            break
        room = [min(options.max_new_tokens, options.max_rollout_tokens - c.completion_length) for c in active]
        sampled = engine.generate(
            [c.tokens for c in active],
            [turn_seed(c.seed, turn) for c in active],
            top_p=top_p,
            temperature=temperature,
            max_new_tokens=max(room),
            candidates=candidates,
        )
        for conversation, rollout, limit in zip(active, sampled, room):
            _take_turn(conversation, rollout, limit, tokenizer, options)
    return [_rollout(c, candidates) for c in conversations]


def _take_turn(conversation: _Conversation, sampled: Rollout, limit: int, tokenizer, options: EpisodeOptions) -> None:
    """Append the student's turn (cut to `limit` tokens) and the episode's answer to it."""
    turn_ids = sampled.tokens[sampled.prompt_length :][:limit]
    conversation.tokens += turn_ids
    conversation.score_mask += [1] * len(turn_ids)
    recorded = sampled.logprobs or [math.nan] * len(turn_ids)
    conversation.logprobs += list(recorded[: len(turn_ids)])
    if sampled.candidate_ids is not None:
        conversation.candidate_rows.append(sampled.candidate_ids[: len(turn_ids)])
    conversation.turns += 1
    # The template renders the turn as the student wrote it, special tokens and all, but its close.
    closed = bool(turn_ids) and turn_ids[-1] in tokenizer.all_special_ids
    written = tokenizer.decode(turn_ids[:-1] if closed else turn_ids, skip_special_tokens=False)
    conversation.messages.append({"role": "assistant", "content": written})
    answer = conversation.episode.respond(tokenizer.decode(turn_ids, skip_special_tokens=True))
    if isinstance(answer, EpisodeEnd):
        conversation.reward, conversation.done = answer.reward, True
        return
    if conversation.turns == options.max_turns:
        conversation.done = True  # no turn left to read the observation
        return
    conversation.messages.append({"role": answer.role, "content": answer.content})
    context = observation_ids(tokenizer, conversation.messages, conversation.tokens)
    if conversation.completion_length + len(context) >= options.max_rollout_tokens:
        conversation.done = True  # no room left for a turn after it
        return
    conversation.tokens += context
    conversation.score_mask += [0 if options.mask_observations else 1] * len(context)
    conversation.logprobs += [math.nan] * len(context)
    conversation.candidate_rows.append(np.zeros((len(context), 0), dtype=np.int32))


def observation_ids(tokenizer, messages: list[dict], tokens: list[int]) -> list[int]:
    """The tokens that follow `tokens` when the student's chat template renders `messages` (ending
    with the observation) and opens the next assistant turn: the close of the student's turn, the
    observation in its role, and the generation prompt."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    written = tokenizer.decode(tokens, skip_special_tokens=False)
    if not rendered.startswith(written):
        # A turn that ended with an end-of-sequence token other than the template's turn close.
        unclosed = tokenizer.decode(tokens[:-1], skip_special_tokens=False)
        if not (tokens[-1] in tokenizer.all_special_ids and rendered.startswith(unclosed)):
            raise ValueError(
                "the student's chat template does not render the conversation as a continuation of its "
                f"tokens, so an observation cannot be appended: the tokens end {written[-80:]!r}, the "
                f"template renders {rendered[max(len(written) - 80, 0) : len(written) + 20]!r}"
            )
        written = unclosed
    return tokenizer(rendered[len(written) :], add_special_tokens=False)["input_ids"]


def _rollout(conversation: _Conversation, candidates: int) -> Rollout:
    candidate_ids = None
    if candidates:
        rows = [np.pad(r, ((0, 0), (0, candidates - r.shape[1]))) for r in conversation.candidate_rows]
        candidate_ids = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, candidates), np.int32)
    return Rollout(
        list(conversation.tokens),
        len(conversation.prompt.ids),
        logprobs=conversation.logprobs,
        candidate_ids=candidate_ids,
        score_mask=np.asarray(conversation.score_mask, dtype=np.uint8),
        turns=conversation.turns,
        reward=conversation.reward,
    )
