"""What travels between the trainer and the teacher, on the trainer's side: the teacher's answer as
numpy arrays (TeacherScores) and the student's tokenizer as OpenSession describes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opd.tensors import from_tensor
from opd.v1 import teacher_pb2


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's answer for one rollout; row p is position score_from + p."""

    ids: np.ndarray  # int32 [P, K], student vocabulary, pad -1
    logprobs: np.ndarray  # float32 [P, K], pad -inf
    token_logprobs: np.ndarray  # float32 [P]
    mask: np.ndarray  # uint8 [P]
    reason: np.ndarray  # uint8 [P]
    coverage: float
    mean_support_mass: float
    # Per-reason counts, retained mass, branch sequences (cross-tokenizer sessions).
    counts: teacher_pb2.Coverage | None = None
    # float32 [P, M]: the teacher's log-probabilities of the request's candidate ids (-inf at pads).
    candidate_logprobs: np.ndarray | None = None

    @classmethod
    def from_proto(cls, response: teacher_pb2.ScoreResponse) -> "TeacherScores":
        return cls(
            ids=from_tensor(response.ids, name="ids", dtype="int32", ndim=2),
            logprobs=from_tensor(response.logprobs, name="logprobs", dtype="float32", ndim=2),
            token_logprobs=from_tensor(response.token_logprobs, name="token_logprobs", dtype="float32", ndim=1),
            mask=from_tensor(response.mask, name="mask", dtype="uint8", ndim=1),
            reason=from_tensor(response.reason, name="reason", dtype="uint8", ndim=1),
            coverage=response.coverage,
            mean_support_mass=response.mean_support_mass,
            counts=response.counts,
            candidate_logprobs=(
                from_tensor(response.candidate_logprobs, name="candidate_logprobs", dtype="float32", ndim=2)
                if response.HasField("candidate_logprobs")
                else None
            ),
        )


def tokenizer_message(tokenizer) -> teacher_pb2.HFTokenizer:
    """Describe a transformers fast tokenizer for OpenSession.

    The server recognises the teacher's own tokenizer from this and then scores
    with exact identity alignment.
    """
    return teacher_pb2.HFTokenizer(
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        special_tokens=list(tokenizer.all_special_tokens),
        eos_tokens=[tokenizer.eos_token] if tokenizer.eos_token else [],
        chat_template=tokenizer.chat_template or "",
    )
