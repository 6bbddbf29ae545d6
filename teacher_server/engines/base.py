"""The interface between the service and an engine.

Engines know nothing of gRPC, sessions or student tokenizers: they take sequences
of teacher token ids and return, for the requested positions only, the teacher's
top-K next tokens with log-probabilities and the log-probability of the actual
next token. Every engine gives these the same meaning:

* log-probabilities are normalised over the teacher's full vocabulary, at the
  job's temperature (logits / temperature before the softmax);
* `exclude_ids` are never part of the returned support, but their probability
  still counts in the normalisation (the support mass then shows what was lost).
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


@dataclass
class ScoringJob:
    token_ids: np.ndarray  # int32 [N], teacher vocabulary
    score_from: int  # rows are positions score_from .. N-1
    top_k: int
    temperature: float = 1.0
    exclude_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_positions(self) -> int:
        return len(self.token_ids) - self.score_from


@dataclass
class TeacherScores:
    ids: np.ndarray  # int32 [P, K] teacher-vocabulary ids of the support
    logprobs: np.ndarray  # float32 [P, K]
    token_logprobs: np.ndarray  # float32 [P] log-probability of token_ids[t]


class Engine(Protocol):
    name: str
    model_name: str
    vocab_size: int
    max_sequence_length: int
    dtype: str

    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        """Score a batch of jobs; called from one worker thread at a time."""
        ...
