"""The SGLang engine: input top logprobs on token-id prompts, prefill only.

UNTESTED AGAINST A LIVE SGLANG: SGLang has no CPU path on our machines. The
request building and the response parsing below are tested against SGLang's
documented formats (tests/teacher_server/test_engine_sglang.py). Also unverified:
that sglang.Engine starts outside the main thread (the server loads engines in a
worker thread; this engine keeps SGLang on one thread with its own event loop).

Request, per job (sglang.Engine.generate; the same fields as the HTTP /generate
endpoint, documented in sgl-project/sglang docs/references/sampling_params.md,
`GenerateReqInput`):

    input_ids=[ids], return_logprob=True, logprob_start_len=score_from - 1,
    top_logprobs_num=N, sampling_params={"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0}

max_new_tokens=0 makes it a prefill-only request, so the prompt goes through the
radix (prefix) cache: SGLang reuses cached KV up to logprob_start_len.

Response, `output["meta_info"]` (sgl-project/sglang,
python/sglang/srt/managers/tokenizer_manager.py `add_logprob_to_meta_info` /
`detokenize_logprob_tokens` / `detokenize_top_logprobs_tokens`, and
python/sglang/srt/managers/scheduler_output_processor_mixin.py
`_process_input_token_logprobs` / `_process_input_top_logprobs`):

* "input_token_logprobs": list of (logprob, token_id, text_or_None) tuples, one
  per prompt position from logprob_start_len = L on; entry 0 (token L) has
  logprob None ("[None] + input_token_logprobs[:-1]"); entry j >= 1 is
  log p(ids[L + j] | ids[:L + j]).
* "input_top_logprobs": same length; entry 0 None, entry j >= 1 a list of N
  (logprob, token_id, text_or_None) tuples, best first, for the distribution
  that predicts position L + j.

With L = score_from - 1 the rows score_from .. n-1 are entries 1 .. n-L-1.

Semantics (engines/base.py): SGLang's input logprobs are a log_softmax of the raw
logits over the full vocabulary; temperature scaling (`temp_scaled_logprobs`) is
off by default and we send temperature 1 and top_p 1 regardless, so the values
are the temperature-1 ones. Other temperatures cannot be recovered from top-N
values, so this engine serves temperature 1 only. `exclude_ids` are handled as in
the vllm engine (engines/support.py: K + |exclude| candidates at most).

Branches (base.py) are prompts of their own, token_ids[:attach] + branch, scored
from attach with logprob_start_len = attach - 1, so the radix cache shares their
prefix with the main pass. The row after a branch's last token is read as an input
row: a placeholder token is appended (prefill only, nothing sampled), hence
max_sequence_length = context length - 2.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from teacher_server.engines.base import EngineConfig, ScoringJob, TeacherScores
from teacher_server.engines.support import Prompt, Rows, check_temperatures, score_jobs

log = logging.getLogger(__name__)

SAMPLING_PARAMS = {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0}
NEXT_PLACEHOLDER = 0  # any id: only the distribution that predicts it is read


class SGLangEngine:
    name = "sglang"
    temperatures = (1.0,)
    supports_branches = True  # as prompts of their own, sharing the radix cache (module docstring)
    supports_requested_ids = False  # SGLang has token_ids_logprob; this adapter does not ask for it yet

    def __init__(self, config: EngineConfig) -> None:
        self.model_name = config.model
        self.dtype = config.dtype
        # sglang.Engine.generate drives SGLang's asyncio tokenizer manager with the event loop of
        # the thread that created it: one thread of its own, with its own loop, does everything.
        self._thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="sglang",
            initializer=lambda: asyncio.set_event_loop(asyncio.new_event_loop()),
        )
        self._thread.submit(self._load, config).result()
        log.info("sglang engine: %s (%s), vocab %d", self.model_name, self.dtype, self.vocab_size)

    def _load(self, config: EngineConfig) -> None:
        try:
            import sglang
        except ImportError as error:
            raise ImportError(
                f"the sglang engine needs SGLang, which is not importable here ({error}): "
                "pip install 'opd-teacher[sglang]' on a CUDA machine"
            ) from error
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(config.model).get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.engine = sglang.Engine(**engine_options(config))
        context = config.max_model_len or int(getattr(text_config, "max_position_embeddings", 0) or 2**31 - 1)
        # SGLang refuses an input as long as its context length, and a branch needs one
        # more position for its placeholder token.
        self.max_sequence_length = context - 2

    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        check_temperatures(self.name, jobs)
        return self._thread.submit(score_jobs, list(jobs), self.vocab_size, self._run).result()

    def _run(self, prompts: list[Prompt], counts: list[int]) -> list[Rows]:
        outputs = self.engine.generate(**generate_request(prompts, counts))
        if isinstance(outputs, dict):  # a batch of one may come back unwrapped
            outputs = [outputs]
        answers = []
        for prompt, n, output in zip(prompts, counts, outputs):
            ids, logprobs, token_logprobs = parse_meta_info(output["meta_info"], input_ids(prompt), prompt.start, n)
            if prompt.with_next:  # the placeholder's own log-probability means nothing
                token_logprobs = token_logprobs[:-1]
            answers.append((ids, logprobs, token_logprobs))
        return answers


def engine_options(config: EngineConfig) -> dict[str, Any]:
    """Keyword arguments of sglang.Engine (its ServerArgs) for our EngineConfig."""
    options: dict[str, Any] = dict(
        model_path=config.model,
        dtype=config.dtype,
        tp_size=config.tensor_parallel_size,
        mem_fraction_static=config.gpu_memory_utilization,
        skip_tokenizer_init=True,  # token ids in, token ids out
        random_seed=0,
    )
    if config.max_model_len is not None:
        options["context_length"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        options["chunked_prefill_size"] = config.max_num_batched_tokens
    options.update(config.engine_args)
    return options


def input_ids(prompt: Prompt) -> np.ndarray:
    """The prompt's ids; with_next adds a placeholder token so that the row after the last
    real token is an input row too (prefill only, no sampling)."""
    return np.append(prompt.token_ids, NEXT_PLACEHOLDER) if prompt.with_next else np.asarray(prompt.token_ids)


def generate_request(prompts: Sequence[Prompt], counts: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of sglang.Engine.generate for a batch (one list entry per prompt)."""
    return dict(
        input_ids=[input_ids(prompt).astype(np.int64).tolist() for prompt in prompts],
        sampling_params=[dict(SAMPLING_PARAMS) for _ in prompts],
        return_logprob=[True] * len(prompts),
        logprob_start_len=[prompt.start - 1 for prompt in prompts],
        top_logprobs_num=[int(n) for n in counts],
    )


def parse_meta_info(meta_info: dict, token_ids: np.ndarray, score_from: int, num: int):
    """SGLang meta_info of a request with logprob_start_len = score_from - 1 ->
    (ids [P, num] best first, log-probs [P, num], token log-probs [P]), P = len(token_ids) - score_from."""
    n = len(token_ids)
    start = score_from - 1
    token_entries = meta_info["input_token_logprobs"]
    top_entries = meta_info["input_top_logprobs"]
    expected = n - start
    if len(token_entries) != expected or len(top_entries) != expected:
        raise RuntimeError(
            f"SGLang returned {len(token_entries)} input token logprobs and {len(top_entries)} input top "
            f"logprobs for logprob_start_len={start} and {n} tokens; expected {expected} of each"
        )
    rows = n - score_from
    token_values = np.empty(rows, dtype=np.float32)
    ids = np.empty((rows, num), dtype=np.int64)
    values = np.empty((rows, num), dtype=np.float32)
    for row in range(rows):
        t = score_from + row
        logprob, token_id = token_entries[row + 1][0], token_entries[row + 1][1]
        if int(token_id) != int(token_ids[t]) or logprob is None:
            raise RuntimeError(
                f"SGLang's input_token_logprobs at position {t} is {token_entries[row + 1][:2]}, "
                f"expected a log-probability for token {int(token_ids[t])}"
            )
        token_values[row] = logprob
        top = top_entries[row + 1]
        if top is None or len(top) < num:
            raise RuntimeError(
                f"SGLang returned {0 if top is None else len(top)} top logprobs at position {t}, expected {num}"
            )
        top = sorted(top, key=lambda entry: -entry[0])[:num]  # best first (stable for ties)
        values[row] = [entry[0] for entry in top]
        ids[row] = [entry[1] for entry in top]
    return ids, values, token_values
