"""(f) Rollout groups: G rollouts of one prompt, scored with and without reuse of the shared prompt.

    python bench/groups.py [--model smollm2] [--groups 512:128:8 256:256:8 128:512:4] [--repeats 2]

A group is G rollouts that share a prompt of P tokens and differ in their C completion tokens
(random ids, fixed seed), scored from the end of the prompt with K=32 in ONE HFEngine.score call,
as the scheduler hands a group that arrives together to the engine:

  shared     the engine's default: the prompt runs once, each completion on its KV cache
             (teacher_server/engines/hf.py, `share_prefixes`)
  unshared   share_prefixes = False: every rollout runs whole, the G rollouts in one padded batch

The two take turns (best of `--repeats`); "ideal" is the ratio of tokens through the backbone,
G (P + C) / (P + G C). Peak RSS: this process's VmHWM above its RSS before the call. The script
also checks that both give the same answer (top-K ids, log-probabilities within 1e-4).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from teacher_server.engines import TeacherScores
    from teacher_server.engines.hf import HFEngine

K = 32


def group(vocab: int, prompt: int, completion: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, prompt, completion, size])
    shared = rng.integers(4, vocab, size=prompt)
    return [np.concatenate([shared, rng.integers(4, vocab, size=completion)]).astype(np.int32) for _ in range(size)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model directory")
    parser.add_argument(
        "--groups", nargs="+", default=["512:128:8", "256:256:8", "128:512:4"], help="PROMPT:COMPLETION:G"
    )
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from teacher_server.engines import EngineConfig
    from teacher_server.engines.hf import HFEngine

    common.header(f"(f) rollout groups on {args.model}, K={K}: shared prompt prefix vs none")
    engine = HFEngine(EngineConfig(model=str(common.model_path(args.model))))
    rows = []
    for spec in args.groups:
        prompt, completion, size = map(int, spec.split(":"))
        row = measure_group(engine, prompt, completion, size, args.repeats)
        rows.append(row)
        common.emit({"bench": "groups", "model": args.model, "k": K, **row, "load_average": common.load_average()})
    common.print_table(
        rows,
        {
            "prompt": "prompt",
            "completion": "completion",
            "group": "G",
            "unshared_pos_s": "unshared pos/s",
            "shared_pos_s": "shared pos/s",
            "speedup": "speedup",
            "cpu_speedup": "speedup per CPU-s",
            "ideal": "ideal",
            "unshared_peak_mib": "unshared peak MiB",
            "shared_peak_mib": "shared peak MiB",
        },
        f"Scored (completion) positions per second, best of {args.repeats}:",
    )
    common.footer()


def measure_group(engine: HFEngine, prompt: int, completion: int, size: int, repeats: int) -> dict:
    """One group scored shared and unshared: their agreement, then the best of `repeats` turns of each."""
    from teacher_server.engines import ScoringJob

    jobs = [ScoringJob(ids, prompt, K) for ids in group(engine.vocab_size, prompt, completion, size)]
    peaks: dict[bool, float] = {}

    def run(share: bool) -> Callable[[], list[TeacherScores]]:
        def call() -> list[TeacherScores]:
            engine.share_prefixes = share
            base = common.rss_mib()
            common.reset_peak_rss()
            scores = engine.score(jobs)
            peaks[share] = max(peaks.get(share, 0.0), common.peak_rss_mib() - base)
            return scores

        return call

    shared, unshared = run(True)(), run(False)()  # also the warm-up of both
    same = float(np.mean([(a.ids == b.ids).mean() for a, b in zip(shared, unshared)]))
    worst = float(max(np.abs(a.logprobs - b.logprobs).max() for a, b in zip(shared, unshared)))
    assert same > 0.999 and worst < 1e-4, (same, worst)
    peaks.clear()
    best = common.interleaved_best({"shared": run(True), "unshared": run(False)}, repeats, warmup=0)
    engine.share_prefixes = True
    positions = size * completion
    return {
        "prompt": prompt,
        "completion": completion,
        "group": size,
        "shared_pos_s": positions / best["shared"]["seconds"],
        "unshared_pos_s": positions / best["unshared"]["seconds"],
        "speedup": best["unshared"]["seconds"] / best["shared"]["seconds"],
        "cpu_speedup": best["unshared"]["cpu_s"] / best["shared"]["cpu_s"],
        "ideal": size * (prompt + completion) / (prompt + size * completion),
        "shared_peak_mib": peaks[True],
        "unshared_peak_mib": peaks[False],
        "same_ids": same,
        "max_abs_logprob": worst,
    }


if __name__ == "__main__":
    main()
