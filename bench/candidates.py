"""What scoring the student's own candidates costs the teacher (issue 19): scored positions per
second with M = 0, 8 and 32 candidate ids per position.

    python bench/candidates.py [--batch 4 --length 512 --top-k 32 --candidates 0 8 32 --repeats 5]

SmolLM2-135M float32 in this process, the hf engine (teacher_server/engines/hf.py) on
`--batch` rollouts of `--length` random ids scored from position 1 with K = `--top-k`; each
variant adds M random candidate ids per position (ScoringJob.requested_ids, the same-tokenizer
path of ScoreRequest.candidate_ids), gathered from the rows the engine computes anyway. Timed in
turns, best of `--repeats` (bench/common.py: interleaved_best), one torch thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from teacher_server.engines import EngineConfig, ScoringJob  # noqa: E402
from teacher_server.engines.hf import HFEngine  # noqa: E402


def jobs(engine: HFEngine, args: argparse.Namespace, candidates: int) -> list[ScoringJob]:
    rng = np.random.default_rng(0)
    positions = args.length - 1
    return [
        ScoringJob(
            token_ids=rng.integers(100, engine.vocab_size, args.length).astype(np.int32),
            score_from=1,
            top_k=args.top_k,
            requested_ids=rng.integers(0, engine.vocab_size, (positions, candidates)) if candidates else None,
        )
        for _ in range(args.batch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--candidates", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    common.header("the teacher's cost of the student's candidates: scored positions/s by M")
    engine = HFEngine(EngineConfig(model=str(common.smollm2_model())))
    batches = {m: jobs(engine, args, m) for m in args.candidates}
    best = common.interleaved_best({m: (lambda m=m: engine.score(batches[m])) for m in args.candidates}, args.repeats)
    positions = args.batch * (args.length - 1)
    baseline = best[args.candidates[0]]["seconds"]
    rows = []
    for m in args.candidates:
        seconds = best[m]["seconds"]
        rows.append(
            {
                "candidates": m,
                "seconds": seconds,
                "positions_per_s": positions / seconds,
                "vs_first": seconds / baseline,
            }
        )
        common.emit(rows[-1])
    common.print_table(
        rows,
        {
            "candidates": "M",
            "seconds": "seconds (best)",
            "positions_per_s": "scored positions/s",
            "vs_first": "time vs M = first",
        },
    )
    common.footer()


if __name__ == "__main__":
    main()
