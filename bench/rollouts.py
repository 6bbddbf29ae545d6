"""Student rollout generation: the hf path (model.generate) against VllmRollouts, in tokens per second.

    .venv-vllm/bin/python bench/rollouts.py [--engines hf,vllm] [--prompts 16] [--max-new-tokens 128] [--top-p 0.9]

Run it under the vLLM environment's python (it has transformers too, so both engines run there).
The model is SmolLM2-135M-Instruct in float32, the directory testkit/real_model.py converts once
(~/.cache/opd/smollm2-135m-instruct-f32); if it is missing, make it in the main environment:
`python -c "from testkit.real_model import smollm2_path; smollm2_path()"`.

Prompts: the first N GSM8K test questions (../shared/data/gsm8k/test.jsonl) as user messages,
rendered with the model's chat template as the trainer renders them (student_trainer/data.py).
Both engines get the same prompts and per-rollout seeds (student_trainer.rollouts.rollout_seeds);
their samplers differ, so the completions (and their lengths) differ: the figure is completion
tokens generated per second of the timed `generate` call, after a short warm-up call
(generate_cpu_s: the CPU time the process spent in it, a check on load from other processes).

Each engine runs in a subprocess of its own, one after the other, so that neither sees the other's
threads (vLLM's CPU worker binds OpenMP threads) or memory. vllm also reports the time of a weight
push (the HF model's state_dict with seeded noise added) and, as a check that the push took, the
max |vLLM - HF| log-prob of rollouts sampled after it (HF recomputes them teacher-forced).

Prints one JSON line per engine, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from student_trainer.rollouts import Rollout
    from student_trainer.vllm_rollouts import VllmRollouts

    Generate = Callable[[list[list[int]], list[int], int], list[Rollout]]  # (prompts, seeds, max_new_tokens)


def load_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for line in GSM8K.read_text().splitlines()[:count]:
        messages = [{"role": "user", "content": json.loads(line)["question"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): less sensitive to other load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> dict:
    """One engine: load, warm up, time one generate call (and for vllm, a weight push)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.rollouts import rollout_seeds
    from testkit.real_model import CACHE

    if not (CACHE / "config.json").exists():
        raise SystemExit(
            f"no converted SmolLM2 at {CACHE}: run in the main environment "
            '`python -c "from testkit.real_model import smollm2_path; smollm2_path()"`'
        )
    tokenizer = AutoTokenizer.from_pretrained(CACHE)
    prompts = load_prompts(tokenizer, args.prompts)
    seeds = rollout_seeds(0, 0, 0, len(prompts))
    eos_ids = [tokenizer.eos_token_id]
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval()
    generate, engine = engine_generate(args, model, tokenizer, eos_ids)
    load_s = time.perf_counter() - started
    generate(prompts[:2], seeds[:2], 8)  # warm-up: first-call allocations, oneDNN primitives
    cpu_started, started = cpu_seconds(), time.perf_counter()
    rollouts = generate(prompts, seeds, args.max_new_tokens)
    generate_s, generate_cpu_s = time.perf_counter() - started, cpu_seconds() - cpu_started
    extra: dict = {}
    if args.child == "vllm":
        extra = check_weight_push(model, engine, generate, prompts, seeds)
        engine.close()

    completion_tokens = sum(r.completion_length for r in rollouts)
    return dict(
        engine=args.child,
        threads=torch.get_num_threads(),
        prompts=len(prompts),
        prompt_tokens=sum(r.prompt_length for r in rollouts),
        completion_tokens=completion_tokens,
        stopped_at_eos=sum(r.tokens[-1] in eos_ids for r in rollouts),
        max_new_tokens=args.max_new_tokens,
        load_s=round(load_s, 2),
        generate_s=round(generate_s, 2),
        tokens_per_s=round(completion_tokens / generate_s, 1),
        generate_cpu_s=round(generate_cpu_s, 2),
        **extra,
    )


def engine_generate(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]
) -> tuple[Generate, VllmRollouts | None]:
    """The engine's `generate(prompts, seeds, max_new_tokens)`: `model`'s for hf; for vllm a
    VllmRollouts' (returned too, to push weights to and to close)."""
    from student_trainer.rollouts import generate_rollouts
    from testkit.real_model import CACHE

    sample = {"top_p": args.top_p, "temperature": args.temperature}
    if args.child == "hf":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

        def generate(batch, batch_seeds, max_new_tokens):
            return generate_rollouts(
                model, batch, seeds=batch_seeds, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=max_new_tokens, **sample
            )

        return generate, None
    from student_trainer.vllm_rollouts import VllmRollouts

    engine = VllmRollouts(str(CACHE), eos_ids=eos_ids, max_model_len=args.max_model_len)

    def generate(batch, batch_seeds, max_new_tokens):
        return engine.generate(batch, batch_seeds, max_new_tokens=max_new_tokens, **sample)

    return generate, engine


def check_weight_push(
    model: PreTrainedModel, engine: VllmRollouts, generate: Generate, prompts: list[list[int]], seeds: list[int]
) -> dict:
    """Push the HF weights plus seeded noise to vLLM: the push's time, and the max |vLLM - HF| log-prob
    of rollouts sampled after it (HF recomputes them teacher-forced)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    started = time.perf_counter()
    engine.push_weights(model.state_dict().items())
    push_s = round(time.perf_counter() - started, 3)
    worst = 0.0
    for rollout in generate(prompts[:4], seeds[:4], 32):
        with torch.no_grad():
            logits = model(torch.tensor([rollout.tokens])).logits[0, rollout.prompt_length - 1 : -1].float()
        completion = torch.tensor(rollout.tokens[rollout.prompt_length :])
        reference = logits.log_softmax(-1).gather(1, completion[:, None])[:, 0]
        worst = max(worst, (reference - torch.tensor(rollout.logprobs)).abs().max().item())
    return {"push_s": push_s, "push_max_logprob_diff": float(f"{worst:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    results = []
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--child", engine] + sys.argv[1:]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-6000:])
            raise SystemExit(f"the {engine} run failed with exit status {done.returncode}")
        results.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)

    columns = [
        "engine",
        "threads",
        "prompts",
        "completion_tokens",
        "stopped_at_eos",
        "load_s",
        "generate_s",
        "tokens_per_s",
        "generate_cpu_s",
        "push_s",
        "push_max_logprob_diff",
    ]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for result in results:
        print("| " + " | ".join(str(result.get(column, "")) for column in columns) + " |")


if __name__ == "__main__":
    main()
