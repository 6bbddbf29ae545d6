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

Rollout groups (several rollouts of one prompt in a batch without branches): jobs that
share a prefix of at least SHARED_PREFIX_MIN tokens run that prefix once; each job's own
tokens then run on the prefix's KV cache, SUFFIX_SEGMENT tokens per pass, and the cache is
cut back to the prefix for the next job of the group (`share_prefixes` turns it off).
"""

from __future__ import annotations

import inspect
import logging
from typing import Sequence

import numpy as np
import torch

from teacher_server.engines.adapters import LoraAdapters
from teacher_server.engines.base import Branch, EngineConfig, ScoringJob, TeacherScores

log = logging.getLogger(__name__)

BRANCH_CHUNK = 512  # branch tokens per job in one pass (bounds the [chunk, sequence] mask)
SHARED_PREFIX_MIN = (
    128  # tokens a group must share before its prefix runs once (shorter: rarely a gain, bench/groups.py)
)
SUFFIX_SEGMENT = 2048  # tokens of a job's own part per pass on the shared prefix (bounds the mask)
# float64: slow, for exactness checks against a float64 reference (the logits stay float64 too).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class HFEngine:
    name = "hf"
    temperatures = None  # logits / temperature before the softmax, any temperature
    supports_branches = True  # ScoringJob.branches, on the KV cache of the main pass
    supports_requested_ids = True  # gathered from the same logits as the top-K
    share_prefixes = True  # rollout groups: a shared prompt prefix runs once (module docstring)

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
        self._buffer: torch.Tensor | None = None  # [chunk_size, vocab] logits, reused (_logits)
        self._logits_dtype = torch.float64 if config.dtype == "float64" else torch.float32
        # Teachers sharing a GPU run side by side (the scheduler's lanes): on a stream of its own
        # each one's kernels interleave with the others' instead of queueing behind a whole batch.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._adapters: LoraAdapters | None = None
        # transformers is renaming the cache argument of forward (past_key_values -> cache).
        parameters = inspect.signature(self.backbone.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.max_sequence_length = int(getattr(model.config, "max_position_embeddings", 0) or 2**31 - 1)
        log.info("hf engine: %s on %s (%s), vocab %d", config.model, self.device, self.dtype, self.vocab_size)

    def load_adapter(self, name: str, path: str, base_name: str) -> int:
        """A LoRA adapter over this model (adapters.py); the bytes of its weights."""
        if self._adapters is None:
            self._adapters = LoraAdapters(self)
        return self._adapters.load(name, path, base_name)

    def score_adapted(self, jobs: Sequence[ScoringJob], adapter: str | None) -> list[TeacherScores]:
        if self._adapters is not None:
            self._adapters.activate(adapter)
        return self.score(jobs)

    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        with torch.cuda.stream(self._stream):  # None: a no-op
            return self._score_jobs(jobs)

    def _score_jobs(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        groups = _shared_prefixes(jobs) if self.share_prefixes and not any(job.branches for job in jobs) else []
        if not groups:
            return self._score_batch(jobs)
        results: list[TeacherScores | None] = [None] * len(jobs)
        grouped = {index for _, members in groups for index in members}
        rest = [index for index in range(len(jobs)) if index not in grouped]
        if rest:
            for index, scores in zip(rest, self._score_batch([jobs[i] for i in rest])):
                results[index] = scores
        for prefix, members in groups:
            for index, scores in zip(members, self._score_group([jobs[i] for i in members], prefix)):
                results[index] = scores
        return results

    def _score_group(self, jobs: Sequence[ScoringJob], prefix: int) -> list[TeacherScores]:
        """Jobs whose first `prefix` tokens are the same (prefix < every job's length):
        the prefix runs once with a KV cache, each job's remaining tokens run on it."""
        shared = torch.from_numpy(np.asarray(jobs[0].token_ids[:prefix], dtype=np.int64))[None].to(self.device)
        output = self.backbone(input_ids=shared, use_cache=True)
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = output.past_key_values
        if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [None])):
            # Sliding-window (or other) cache layers do not crop back to the prefix exactly. The
            # model's cache is the same every time: stop sharing, so this prefix pass is the only one wasted.
            log.info(
                "the model's KV cache has %s layers: rollout groups are scored as plain batches",
                sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}),
            )
            self.share_prefixes = False
            return self._score_batch(jobs)
        prefix_hidden = output.last_hidden_state[0]
        results = []
        for job in jobs:
            suffix = torch.from_numpy(np.asarray(job.token_ids[prefix:], dtype=np.int64)).to(self.device)
            parts = [prefix_hidden]
            for start in range(0, len(suffix), SUFFIX_SEGMENT):
                segment = suffix[start : start + SUFFIX_SEGMENT][None]
                state = self.backbone(input_ids=segment, use_cache=True, **{self._cache_argument: cache})
                parts.append(state.last_hidden_state[0])
            cache.crop(-len(suffix))  # back to the shared prefix for the next job
            hidden = torch.cat(parts)
            results.append(self._score_main(hidden[job.score_from - 1 : len(job.token_ids) - 1], job))
        return results

    def _score_batch(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        with_branches = any(job.branches for job in jobs)
        hidden, cache = self._final_hidden_states(jobs, keep_cache=with_branches)
        results = [
            self._score_main(hidden[row, job.score_from - 1 : len(job.token_ids) - 1], job)
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

    def _score_branches(
        self, jobs: Sequence[ScoringJob], hidden: torch.Tensor, cache, results: list[TeacherScores]
    ) -> None:
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
            before, targets, ends, start = [], [], [], 0
            for branch in job.branches:
                size = len(branch.token_ids)
                before.append(hidden[row, branch.attach - 1 : branch.attach])
                before.append(branch_hidden[start : start + size - 1])
                targets.append(branch.token_ids)
                start += size
                ends.append(start - 1)
            before_scores = self._score_rows(torch.cat(before), job, np.concatenate(targets), top_k=1)
            result = results[row]
            result.branch_token_logprobs = before_scores.token_logprobs
            result.branch_ids, result.branch_logprobs = self._rows_after(job, branch_hidden, ends)

    def _rows_after(self, job: ScoringJob, branch_hidden: torch.Tensor, ends: list[int]):
        """(ids, log-probabilities) [len(branches), K]: the top-K row after each branch's last token
        (state `ends[b]`), computed only for the branches that want it (Branch.row_after)."""
        ids = np.full((len(ends), job.top_k), -1, dtype=np.int32)
        logprobs = np.full((len(ends), job.top_k), -np.inf, dtype=np.float32)
        wanted = [b for b, branch in enumerate(job.branches) if branch.row_after]
        if wanted:
            states = branch_hidden[torch.tensor([ends[b] for b in wanted], device=branch_hidden.device)]
            part = self._score_rows(states, job, np.zeros(len(wanted), dtype=np.int64))
            ids[wanted], logprobs[wanted] = part.ids, part.logprobs
        return ids, logprobs

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

    def _score_main(self, hidden: torch.Tensor, job: ScoringJob) -> TeacherScores:
        """The job's own rows from its hidden states [P, H]: only those of job.rows when it says
        which (the others: ids -1, log-probabilities -inf, token log-probability 0)."""
        targets = job.token_ids[job.score_from :]
        if job.rows is None or job.rows.all():
            return self._score_rows(hidden, job, targets, requested_ids=job.requested_ids)
        wanted = np.flatnonzero(job.rows)
        requested = None if job.requested_ids is None else job.requested_ids[wanted]
        part = self._score_rows(
            hidden[torch.from_numpy(wanted).to(hidden.device)], job, targets[wanted], None, requested
        )
        rows = len(targets)
        scores = TeacherScores(
            ids=np.full((rows, job.top_k), -1, dtype=np.int32),
            logprobs=np.full((rows, job.top_k), -np.inf, dtype=np.float32),
            token_logprobs=np.zeros(rows, dtype=np.float32),
        )
        scores.ids[wanted], scores.logprobs[wanted], scores.token_logprobs[wanted] = (
            part.ids,
            part.logprobs,
            part.token_logprobs,
        )
        if requested is not None:
            scores.requested_logprobs = np.full(job.requested_ids.shape, -np.inf, dtype=np.float32)
            scores.requested_logprobs[wanted] = part.requested_logprobs
        return scores

    def _score_rows(
        self,
        hidden: torch.Tensor,
        job: ScoringJob,
        targets: np.ndarray,
        top_k: int | None = None,
        requested_ids: np.ndarray | None = None,
    ) -> TeacherScores:
        """Top-K and target log-probabilities for hidden states [P, H] of one job.

        Per chunk of rows, on the logits [chunk, V] (float32 or float64, in a reused buffer, see
        _logits): the targets' logits, the row maximum m, the excluded ids' logits
        (kept aside, then set to -inf), top-K on the logits themselves (log-softmax is
        monotone, so the same ids), and last the normaliser m + log(sum exp(logits - m)),
        exponentiating the buffer in place. Nothing [chunk, V]-sized is allocated and
        the full log-softmax is never written. Results go straight into the output arrays.
        """
        top_k = job.top_k if top_k is None else top_k
        rows = hidden.shape[0]
        exclude_np = np.unique(np.asarray(job.exclude_ids, dtype=np.int64))
        k = min(top_k, self.vocab_size - len(exclude_np))
        ids = np.full((rows, top_k), -1, dtype=np.int32)
        logprobs = np.full((rows, top_k), -np.inf, dtype=np.float32)
        token_logprobs = np.empty(rows, dtype=np.float32)
        ids_out, logprobs_out, token_out = (
            torch.from_numpy(ids),
            torch.from_numpy(logprobs),
            torch.from_numpy(token_logprobs),
        )
        targets = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(self.device)
        exclude = torch.from_numpy(exclude_np).to(self.device) if len(exclude_np) else None
        requested, requested_out = _requested(requested_ids, self.device)
        for start in range(0, rows, self.chunk_size):
            end = min(start + self.chunk_size, rows)
            logits = self._logits(hidden[start:end])  # float32 [n, V]; ours to overwrite
            if job.temperature != 1.0:
                logits.div_(job.temperature)
            target_logits = logits.gather(-1, targets[start:end, None])
            requested_logits = logits.gather(-1, requested[start:end]) if requested is not None else None
            peak = logits.amax(dim=-1, keepdim=True)
            if exclude is not None:
                # Out of the support, still in the normaliser.
                excluded = logits.index_select(-1, exclude)
                logits.index_fill_(-1, exclude, float("-inf"))
            top_logits, top_ids = logits.topk(k, dim=-1)
            total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            if exclude is not None:
                total += excluded.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            normaliser = total.log_().add_(peak)
            ids_out[start:end, :k].copy_(top_ids)
            logprobs_out[start:end, :k].copy_(top_logits.sub_(normaliser))
            token_out[start:end].copy_(target_logits.sub_(normaliser).squeeze(-1))
            if requested_logits is not None:
                requested_out[start:end].copy_(requested_logits.sub_(normaliser))
        scores = TeacherScores(ids=ids, logprobs=logprobs, token_logprobs=token_logprobs)
        if requested is not None:
            pads = np.asarray(requested_ids) < 0
            scores.requested_logprobs = np.where(pads, np.float32(-np.inf), requested_out.numpy())
        return scores

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] (float64 for a float64 model) of hidden states [n, H], n <= chunk_size,
        in a buffer reused across chunks and calls: a fresh [chunk, V] tensor per chunk (50 MB at V=49k and 256
        rows, above glibc's mmap threshold) costs page faults comparable to the top-K itself.
        A plain nn.Linear head of the buffer's dtype is applied with torch.mm into it; any other head
        (bias, another dtype, a wrapper) is called as a module and its output copied in."""
        rows = hidden.shape[0]
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < rows or buffer.device != hidden.device:
            shape = (max(rows, self.chunk_size), self.vocab_size)
            buffer = self._buffer = torch.empty(shape, dtype=self._logits_dtype, device=hidden.device)
        out = buffer[:rows]
        head = self.lm_head
        if type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == out.dtype:
            return torch.mm(hidden, head.weight.t(), out=out)
        logits = head(hidden)
        if logits.dtype == out.dtype:
            return logits  # a fresh tensor of the module's: as good as the buffer
        return out.copy_(logits)


def _requested(requested_ids: np.ndarray | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Requested ids [P, M] as a gather index (pads read id 0, masked after) and their output rows."""
    if requested_ids is None:
        return None, None
    wanted = np.asarray(requested_ids, dtype=np.int64)
    return torch.from_numpy(np.maximum(wanted, 0)).to(device), torch.empty(wanted.shape, dtype=torch.float32)


def _shared_prefixes(jobs: Sequence[ScoringJob], minimum: int = SHARED_PREFIX_MIN) -> list[tuple[int, list[int]]]:
    """(prefix length, job indices) of every group of >= 2 jobs whose first `minimum` tokens agree,
    with the length of what all of them share (< each one's length); groups sharing less are left out."""
    by_head: dict[bytes, list[int]] = {}
    for index, job in enumerate(jobs):
        if len(job.token_ids) > minimum:
            head = np.ascontiguousarray(job.token_ids[:minimum], dtype=np.int64).tobytes()
            by_head.setdefault(head, []).append(index)
    groups = []
    for members in by_head.values():
        if len(members) < 2:
            continue
        first = np.asarray(jobs[members[0]].token_ids)
        prefix = min(len(jobs[i].token_ids) for i in members) - 1
        for index in members[1:]:
            differ = np.flatnonzero(first[:prefix] != np.asarray(jobs[index].token_ids[:prefix]))
            if differ.size:
                prefix = int(differ[0])
        if prefix >= minimum:
            groups.append((prefix, members))
    return groups


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
