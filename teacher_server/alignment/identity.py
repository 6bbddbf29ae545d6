"""A student with the teacher's own tokenizer: its ids are the teacher's ids, one teacher pass.

Special targets other than the kept pairs (EOS by default) are masked SPECIAL and never
offered as support, with the lm head's rows no token owns (sessions.TeacherVocabulary). A
request may give the teacher another prompt than the student's (chat messages in the teacher's
template, or teacher ids): the completion is scored after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server.alignment.chat import TeacherChat
from teacher_server.alignment.result import Steps, mask_context, result_from
from teacher_server.alignment.specials import SpecialMap, SpecialVocab, excluded_support
from teacher_server.engines.base import ScoringJob
from teacher_server.errors import InvalidArgument

SPECIAL = teacher_pb2.MASK_REASON_SPECIAL


@dataclass(frozen=True, eq=False)
class IdentityAlignment:
    masked_targets: np.ndarray  # bool [vocab]: a position whose target is one of these is masked
    excluded: np.ndarray  # int64: teacher ids never offered as support
    max_sequence_length: int
    # The teacher's chat rendering, built on first use (None: the teacher has none to offer).
    teacher_chat: Callable[[], TeacherChat | None] = lambda: None
    heavy_steps = False  # one job in, the masks out: cheaper than a hop to a worker thread

    @classmethod
    def build(
        cls,
        vocab: SpecialVocab,
        specials: SpecialMap,
        unowned_rows: np.ndarray,
        model_vocab_size: int,
        max_sequence_length: int,
        teacher_chat: Callable[[], TeacherChat | None] = lambda: None,
    ) -> "IdentityAlignment":
        masked = np.zeros(model_vocab_size, dtype=bool)
        masked[[index for index in specials.masked_targets(vocab) if index < model_vocab_size]] = True
        special_ids = np.asarray(sorted(index for index in vocab.special.values() if index < model_vocab_size))
        excluded = excluded_support(special_ids.astype(np.int64), specials, unowned_rows)
        return cls(masked, excluded, max_sequence_length, teacher_chat)

    def steps(
        self,
        tokens: np.ndarray,
        score_from: int,
        top_k: int,
        temperature: float,
        messages: Sequence[tuple[str, str]] = (),
        rounds: int | None = None,
        requested_ids: np.ndarray | None = None,
        teacher_prompt_ids: np.ndarray | None = None,
        score_mask: np.ndarray | None = None,
    ) -> Steps:
        if teacher_prompt_ids is not None or messages:
            prompt = teacher_prompt_ids if teacher_prompt_ids is not None else self._render(messages)
            tokens = np.concatenate([np.asarray(prompt, dtype=tokens.dtype), tokens[score_from:]])
            score_from = len(prompt)
        if len(tokens) > self.max_sequence_length:
            raise InvalidArgument(
                f"the teacher's sequence (its prompt and the completion) has {len(tokens)} ids but its context "
                f"holds {self.max_sequence_length}; truncate the rollout or cap max_new_tokens"
            )
        job = ScoringJob(
            token_ids=tokens,
            score_from=score_from,
            top_k=top_k,
            temperature=temperature,
            exclude_ids=self.excluded,
            requested_ids=requested_ids,
            rows=score_mask,
        )
        scores = yield job
        masked = self.masked_targets[tokens[score_from:]]
        reason = np.where(masked, SPECIAL, teacher_pb2.MASK_REASON_OK).astype(np.uint8)
        mass = np.exp(scores.logprobs.astype(np.float64)).sum(axis=1)
        result = result_from(scores.ids, scores.logprobs, scores.token_logprobs, reason, mass)
        result.requested_logprobs = scores.requested_logprobs
        return mask_context(result, score_mask)

    def _render(self, messages: Sequence[tuple[str, str]]) -> np.ndarray:
        chat = self.teacher_chat()
        if chat is None:
            raise InvalidArgument("this teacher cannot render chat messages; send its prompt as teacher_prompt_ids")
        try:
            return chat.encode_chat(messages)
        except ValueError as error:  # no chat template, or one that refuses these messages
            raise InvalidArgument(str(error)) from None
