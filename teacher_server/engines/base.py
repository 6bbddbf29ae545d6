"""The interface between the service and an engine.

Engines know nothing of gRPC, sessions or student tokenizers: they take sequences
of teacher token ids and return, for the requested positions only, the teacher's
top-K next tokens with log-probabilities and the log-probability of the actual
next token. Every engine gives these the same meaning:

* log-probabilities are normalised over the teacher's full vocabulary, at the
  job's temperature (logits / temperature before the softmax);
* `exclude_ids` are never part of the returned support, but their probability
  still counts in the normalisation (the support mass then shows what was lost);
* `branches` are extra continuations of the job's own sequence: branch b scores
  `token_ids[:attach] + branch.token_ids` and returns the log-probability of each
  branch token given what precedes it, plus, after its last token, the same top-K
  row as a main position would (a branch that says it needs no such row,
  `row_after=False`, may get -1 / -inf there). The service uses them to follow teacher
  paths that the rollout itself does not take (multi-token candidates of a
  cross-tokenizer session). An engine may score them as separate sequences; one
  that shares the prefix (a KV cache, prefix caching) makes them cost only their
  own tokens. A job without branches is scored exactly as before. An engine
  that cannot score branches says so with `supports_branches = False`; the
  service then sends it none (cross-tokenizer sessions project without
  expansion rounds).

What an engine can do it declares (the Engine protocol), so the service reads
attributes instead of probing for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    # Rows of the lm head processed at once: peak extra memory is
    # chunk_size x vocab_size floats, whatever the sequence length.
    chunk_size: int = 256
    # vllm / sglang only (the hf engine ignores them).
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # sglang: mem_fraction_static
    max_model_len: int | None = None  # None: the model's own context length
    # Prompt tokens per engine step (vLLM chunked prefill / SGLang chunked prefill size);
    # bounds the float32 [tokens, vocab] log-softmax these engines build for prompt logprobs.
    max_num_batched_tokens: int | None = None
    # Further keyword arguments passed to vllm.LLM / sglang.Engine as they are.
    engine_args: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Branch:
    attach: int  # 1 <= attach <= len(job.token_ids): the branch follows token_ids[:attach]
    token_ids: np.ndarray  # int32 [m], m >= 1, teacher vocabulary
    # The top-K row after its last token is wanted (the expansion's branches); the candidates'
    # branches need only their tokens' log-probabilities, and an engine may skip the row.
    row_after: bool = True


@dataclass
class ScoringJob:
    token_ids: np.ndarray  # int32 [N], teacher vocabulary
    score_from: int  # rows are positions score_from .. N-1
    top_k: int
    temperature: float = 1.0
    exclude_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    branches: tuple[Branch, ...] = ()
    # int64 [P, M]: ids whose log-probabilities are wanted at each position whatever the top-K
    # (excluded ids included), -1 where a row has fewer; None: none. Engines that declare
    # supports_requested_ids only.
    requested_ids: np.ndarray | None = None
    # bool [P]: the rows wanted (None: all). An engine may skip the others (hf does: no lm head,
    # no top-K there); their values are not read.
    rows: np.ndarray | None = None

    @property
    def num_positions(self) -> int:
        return len(self.token_ids) - self.score_from

    @property
    def num_branch_tokens(self) -> int:
        return sum(len(branch.token_ids) for branch in self.branches)


@dataclass
class TeacherScores:
    ids: np.ndarray  # int32 [P, K] teacher-vocabulary ids of the support
    logprobs: np.ndarray  # float32 [P, K]
    token_logprobs: np.ndarray  # float32 [P] log-probability of token_ids[t]
    # Branch rows, one per branch (None without branches): row b is the top-K after
    # token_ids[:attach] + the whole of branch b.
    branch_ids: np.ndarray | None = None  # int32 [len(branches), K]
    branch_logprobs: np.ndarray | None = None  # float32 [len(branches), K]
    # float32 [sum of branch lengths], branches one after the other: log p(branch[i] | ... + branch[:i])
    branch_token_logprobs: np.ndarray | None = None
    requested_logprobs: np.ndarray | None = None  # float32 [P, M] of job.requested_ids, -inf at its -1s


class Engine(Protocol):
    name: str
    model_name: str
    vocab_size: int
    max_sequence_length: int
    dtype: str
    # The only temperatures scored exactly (vllm and sglang: (1.0,), their prompt log-probabilities
    # come from the raw logits), or None for any positive one; the service refuses others.
    temperatures: tuple[float, ...] | None
    supports_branches: bool  # ScoringJob.branches (module docstring)
    supports_requested_ids: bool  # ScoringJob.requested_ids

    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        """Score a batch of jobs; called from this engine's one worker thread (its scheduler lane)."""
        ...
