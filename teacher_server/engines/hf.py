"""The default engine: Hugging Face transformers + torch, on CPU or CUDA.

One forward pass of the backbone over the right-padded batch, then the lm head,
log-softmax normaliser and top-K on the scored rows only, `chunk_size` rows at a
time, so that extra memory is bounded by chunk_size x vocab_size and never by
sequence length x vocab_size.

Branches (base.py) share the prefix through the KV cache: when a batch has any,
the main pass keeps its cache and one more pass runs all branch tokens of the
batch at once, each attending to its job's prefix token_ids[:attach] and to the
earlier tokens of its own branch (a 4D mask, positions attach + i), so a branch
costs its own tokens, not its prefix. Batches without branches run as before.
"""

from __future__ import annotations

import inspect
import logging
from typing import Sequence

import numpy as np
import torch

from teacher_server.engines.base import Branch, EngineConfig, ScoringJob, TeacherScores

log = logging.getLogger(__name__)

BRANCH_CHUNK = 512  # branch tokens per job in one pass (bounds the [chunk, sequence] mask)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    name = "hf"
    supports_branches = True  # ScoringJob.branches, on the KV cache of the main pass

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
        # transformers is renaming the cache argument of forward (past_key_values -> cache).
        parameters = inspect.signature(self.backbone.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.max_sequence_length = int(getattr(model.config, "max_position_embeddings", 0) or 2**31 - 1)
        log.info("hf engine: %s on %s (%s), vocab %d", config.model, self.device, self.dtype, self.vocab_size)

    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        with_branches = any(job.branches for job in jobs)
        hidden, cache = self._final_hidden_states(jobs, keep_cache=with_branches)
        results = [
            self._score_rows(hidden[row, job.score_from - 1 : len(job.token_ids) - 1], job, job.token_ids[job.score_from :])
            for row, job in enumerate(jobs)
        ]
        if with_branches:
            self._score_branches(jobs, hidden, cache, results)
        return results

    def _final_hidden_states(self, jobs: Sequence[ScoringJob], keep_cache: bool = False):
        # Right padding needs no attention mask: with causal attention a real token
        # never attends to the pads that follow it. Only real rows are read back.
        longest = max(len(job.token_ids) for job in jobs)
        input_ids = torch.zeros((len(jobs), longest), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, : len(job.token_ids)] = torch.from_numpy(job.token_ids.astype(np.int64))
        output = self.backbone(input_ids=input_ids.to(self.device), use_cache=keep_cache)
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        return output.last_hidden_state, (cache if keep_cache else None)

    def _score_branches(self, jobs: Sequence[ScoringJob], hidden: torch.Tensor, cache, results: list[TeacherScores]) -> None:
        """Every branch token of the batch on top of the main pass's KV cache.

        Branch tokens go through in chunks of whole branches (at most BRANCH_CHUNK tokens
        per job and pass, a branch never split), so the attention mask stays
        [chunk, sequence + chunk]; after each pass the cache is cut back to the main pass.
        """
        for job in jobs:
            for branch in job.branches:
                if len(branch.token_ids) < 1 or not 1 <= branch.attach <= len(job.token_ids):
                    raise ValueError(
                        f"bad branch: attach {branch.attach}, {len(branch.token_ids)} tokens, "
                        f"sequence of {len(job.token_ids)}"
                    )
        chunks = [_chunks(job.branches) for job in jobs]
        outputs: list[list[torch.Tensor]] = [[] for _ in jobs]
        for index in range(max(len(c) for c in chunks)):
            part = [c[index] if index < len(c) else () for c in chunks]
            for row, states in enumerate(self._branch_pass(part, hidden, cache)):
                outputs[row].append(states)
        for row, job in enumerate(jobs):
            if not job.branches:
                continue
            branch_hidden = torch.cat(outputs[row])
            # The hidden state before each branch token: the main position attach-1 for the
            # first token, the previous branch token for the others.
            before, targets, start = [], [], 0
            for branch in job.branches:
                size = len(branch.token_ids)
                before.append(hidden[row, branch.attach - 1 : branch.attach])
                before.append(branch_hidden[start : start + size - 1])
                targets.append(branch.token_ids)
                start += size
            before_scores = self._score_rows(torch.cat(before), job, np.concatenate(targets), top_k=1)
            after_scores = self._score_rows(branch_hidden[:start], job, np.zeros(start, dtype=np.int64))
            result = results[row]
            result.branch_ids = after_scores.ids
            result.branch_logprobs = after_scores.logprobs
            result.branch_token_logprobs = before_scores.token_logprobs

    def _branch_pass(self, part: list[tuple[Branch, ...]], hidden: torch.Tensor, cache) -> list[torch.Tensor]:
        """One pass of some branches per job; returns each job's branch hidden states [tokens, H]."""
        longest = hidden.shape[1]
        sizes = [sum(len(b.token_ids) for b in branches) for branches in part]
        width = max(max(sizes), 1)
        input_ids = torch.zeros((len(part), width), dtype=torch.long)
        positions = torch.zeros((len(part), width), dtype=torch.long)
        allowed = torch.zeros((len(part), 1, width, longest + width), dtype=torch.bool)
        for row, branches in enumerate(part):
            start = 0
            for branch in branches:
                size = len(branch.token_ids)
                rows = slice(start, start + size)
                input_ids[row, rows] = torch.from_numpy(branch.token_ids.astype(np.int64))
                positions[row, rows] = branch.attach + torch.arange(size)
                allowed[row, 0, rows, : branch.attach] = True  # the job's own prefix
                allowed[row, 0, rows, longest + start : longest + start + size] = torch.ones(size, size).tril().bool()
                start += size
            # Padding rows attend to themselves only (a fully masked row would give NaN).
            pad = torch.arange(start, width)
            allowed[row, 0, pad, longest + pad] = True
        dtype = hidden.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        states = self.backbone(
            input_ids=input_ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=True,
            **{self._cache_argument: cache},
        ).last_hidden_state
        cache.crop(-width)  # the next pass sees the main sequence only
        return [states[row, :size] for row, size in enumerate(sizes)]

    def _score_rows(self, hidden: torch.Tensor, job: ScoringJob, targets: np.ndarray, top_k: int | None = None) -> TeacherScores:
        """Top-K and target log-probabilities for hidden states [P, H] of one job."""
        top_k = job.top_k if top_k is None else top_k
        targets = torch.from_numpy(targets.astype(np.int64)).to(self.device)
        exclude = torch.from_numpy(job.exclude_ids.astype(np.int64)).to(self.device)
        k = min(top_k, self.vocab_size - len(exclude))
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
            ids=_pad_columns(torch.cat(ids).to(torch.int32).cpu().numpy(), top_k, -1),
            logprobs=_pad_columns(torch.cat(logprobs).cpu().numpy(), top_k, -np.inf),
            token_logprobs=torch.cat(token_logprobs).squeeze(-1).cpu().numpy(),
        )


def _chunks(branches: Sequence[Branch]) -> list[tuple[Branch, ...]]:
    """Whole branches in groups of at most BRANCH_CHUNK tokens (a longer branch alone)."""
    groups: list[tuple[Branch, ...]] = []
    current: list[Branch] = []
    size = 0
    for branch in branches:
        if current and size + len(branch.token_ids) > BRANCH_CHUNK:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(branch)
        size += len(branch.token_ids)
    if current:
        groups.append(tuple(current))
    return groups


def _pad_columns(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    """Pad [P, k] to [P, width] when the vocabulary left fewer than K candidates."""
    if array.shape[1] == width:
        return array
    padded = np.full((array.shape[0], width), fill, dtype=array.dtype)
    padded[:, : array.shape[1]] = array
    return padded
