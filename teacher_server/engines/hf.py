"""The default engine: Hugging Face transformers + torch, on CPU or CUDA.

One forward pass of the backbone over the right-padded batch, then the lm head,
log-softmax normaliser and top-K on the scored rows only, `chunk_size` rows at a
time, so that extra memory is bounded by chunk_size x vocab_size and never by
sequence length x vocab_size.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from teacher_server.engines.base import EngineConfig, ScoringJob, TeacherScores

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    name = "hf"

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM

        if config.dtype not in DTYPES:
            raise ValueError(f"dtype {config.dtype!r} is not one of {sorted(DTYPES)}")
        self.model_name = config.model
        self.dtype = config.dtype
        self.device = torch.device(config.device)
        self.chunk_size = config.chunk_size
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=DTYPES[config.dtype])
        self.model = model.to(self.device).eval()
        # The backbone gives final hidden states; the lm head is applied per chunk below.
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError("models with final logit soft-capping are not supported by the hf engine yet")
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.max_sequence_length = int(getattr(model.config, "max_position_embeddings", 0) or 2**31 - 1)
        log.info("hf engine: %s on %s (%s), vocab %d", config.model, self.device, self.dtype, self.vocab_size)

    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        hidden = self._final_hidden_states(jobs)
        return [self._score_rows(hidden[row, job.score_from - 1 : len(job.token_ids) - 1], job) for row, job in enumerate(jobs)]

    def _final_hidden_states(self, jobs: Sequence[ScoringJob]) -> torch.Tensor:
        # Right padding needs no attention mask: with causal attention a real token
        # never attends to the pads that follow it. Only real rows are read back.
        longest = max(len(job.token_ids) for job in jobs)
        input_ids = torch.zeros((len(jobs), longest), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, : len(job.token_ids)] = torch.from_numpy(job.token_ids.astype(np.int64))
        return self.backbone(input_ids=input_ids.to(self.device), use_cache=False).last_hidden_state

    def _score_rows(self, hidden: torch.Tensor, job: ScoringJob) -> TeacherScores:
        """Top-K and target log-probabilities for hidden states [P, H] of one job."""
        targets = torch.from_numpy(job.token_ids[job.score_from :].astype(np.int64)).to(self.device)
        exclude = torch.from_numpy(job.exclude_ids.astype(np.int64)).to(self.device)
        k = min(job.top_k, self.vocab_size - len(exclude))
        ids, logprobs, token_logprobs = [], [], []
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = self.lm_head(hidden[start : start + self.chunk_size]).float()
            if job.temperature != 1.0:
                logits /= job.temperature
            normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            chunk_targets = targets[start : start + self.chunk_size, None]
            token_logprobs.append(logits.gather(-1, chunk_targets) - normaliser)
            logits.index_fill_(-1, exclude, float("-inf"))
            top_logits, top_ids = logits.topk(k, dim=-1)
            ids.append(top_ids)
            logprobs.append(top_logits - normaliser)
        return TeacherScores(
            ids=_pad_columns(torch.cat(ids).to(torch.int32).cpu().numpy(), job.top_k, -1),
            logprobs=_pad_columns(torch.cat(logprobs).cpu().numpy(), job.top_k, -np.inf),
            token_logprobs=torch.cat(token_logprobs).squeeze(-1).cpu().numpy(),
        )


def _pad_columns(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    """Pad [P, k] to [P, width] when the vocabulary left fewer than K candidates."""
    if array.shape[1] == width:
        return array
    padded = np.full((array.shape[0], width), fill, dtype=array.dtype)
    padded[:, : array.shape[1]] = array
    return padded
