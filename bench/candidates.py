"""The student's own candidates (issue 19): what scoring them costs the teacher, and how exact the
cross-tokenizer values are.

    python bench/candidates.py engine [--batch 4 --length 512 --top-k 32 --candidates 0 8 32 --repeats 5]
    python bench/candidates.py cross [--students gpt2 mistral-sp-v1 tekken] [--answers 8] [--candidates 0 8 32]
    python bench/candidates.py exact [--students mistral-sp-v1 tekken gpt2] [--answers 100] [--width 12]
                                     [--skip 0] [--dtype float32]

SmolLM2-135M float32 in this process, the hf engine (teacher_server/engines/hf.py), one torch thread.

engine: `--batch` rollouts of `--length` random ids scored from position 1 with K = `--top-k`;
each variant adds M random candidate ids per position (ScoringJob.requested_ids, the
same-tokenizer path of ScoreRequest.candidate_ids), gathered from the rows the engine computes
anyway. Timed in turns, best of `--repeats` (bench/common.py: interleaved_best).

cross: whole cross-tokenizer requests (align, the teacher pass, the branch rounds, the
projection: CrossTokenizer.score) on `--answers` GSM8K answers written with each real student
tokenizer (the question as chat messages), with M = 0, 8, 32 candidates per position: the
first M ids of the projected support at K = M, as a student close to the teacher would name.
Their paths' single tokens are read at their rows of the main pass, longer ones are branches of
it (alignment/candidates.py). Scored positions per second, best of `--repeats`, and branch
tokens per candidate.

exact: testkit/candidate_check.py on `--answers` answers per student: every candidate (`--width`
per position: the target, support entries, random tokens, tokens that begin with the target's
first byte) at every position against brute force (the teacher tokenizer's encoding of the
partial bytes and the candidate, float64 full-vocabulary rows); mean, p99, max and the share
over 1e-4 nats per kind (on a boundary, inside a teacher token, across several teacher tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from teacher_server.engines import EngineConfig, ScoringJob  # noqa: E402
from teacher_server.engines.hf import HFEngine  # noqa: E402


def engine_jobs(engine: HFEngine, args: argparse.Namespace, candidates: int) -> list[ScoringJob]:
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


def engine_cost(args: argparse.Namespace) -> None:
    common.header("the teacher's cost of the student's candidates (same tokenizer): scored positions/s by M")
    engine = HFEngine(EngineConfig(model=str(common.smollm2_model())))
    batches = {m: engine_jobs(engine, args, m) for m in args.candidates}
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
    columns = {
        "candidates": "M",
        "seconds": "seconds (best)",
        "positions_per_s": "scored positions/s",
        "vs_first": "time vs M = first",
    }
    common.print_table(rows, columns)
    common.footer()


def rollouts(student: str, count: int) -> list[tuple[np.ndarray, int, list]]:
    from testkit import tokenizers as T

    tokenizer = T.load(student)
    out = []
    for example in T.gsm8k()[1::2][:count]:
        prompt = tokenizer(example["question"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((np.asarray(prompt + completion), len(prompt), [("user", example["question"])]))
    return out


def cross_cost(args: argparse.Namespace) -> None:
    from testkit import teachers

    common.header("cross-tokenizer requests with the student's candidates: scored positions/s by M")
    engine = teachers.smollm2_engine()
    rows = []
    for student in args.students:
        cross = teachers.cross(student, "smollm2", engine)
        work = rollouts(student, args.answers)
        requested = {0: [None] * len(work)}
        for m in [m for m in args.candidates if m]:
            requested[m] = [cross.score(engine, t, s, m, messages=msg).ids.astype(np.int64) for t, s, msg in work]

        def run(m: int) -> dict:
            started, branch_tokens = time.perf_counter(), 0
            for (tokens, score_from, messages), ids in zip(work, requested[m]):
                result = cross.score(engine, tokens, score_from, 32, messages=messages, requested_ids=ids)
                branch_tokens += result.counts.branch_tokens
            return {"seconds": time.perf_counter() - started, "branch_tokens": branch_tokens}

        counted = {m: run(m)["branch_tokens"] for m in args.candidates}  # also the warm-up
        best = common.interleaved_best({m: (lambda m=m: run(m)) for m in args.candidates}, args.repeats, warmup=0)
        positions = sum(len(tokens) - score_from for tokens, score_from, _ in work)
        asked = {m: sum(int((ids >= 0).sum()) for ids in requested[m]) if m else 0 for m in args.candidates}
        for m in args.candidates:
            extra = counted[m] - counted[args.candidates[0]]
            rows.append(
                {
                    "student": student,
                    "candidates": m,
                    "positions_per_s": positions / best[m]["seconds"],
                    "vs_none": best[m]["seconds"] / best[args.candidates[0]]["seconds"],
                    "branch_tokens_per_candidate": extra / asked[m] if m else 0.0,
                }
            )
            common.emit(rows[-1])
    columns = {
        "student": "student",
        "candidates": "M",
        "positions_per_s": "scored positions/s",
        "vs_none": "time vs M = 0",
        "branch_tokens_per_candidate": "candidate branch tokens per candidate",
    }
    common.print_table(rows, columns)
    common.footer()


def exactness(args: argparse.Namespace) -> None:
    from testkit import teachers
    from testkit import tokenizers as T
    from testkit.candidate_check import CandidateCheck, check_example

    common.header(f"cross-tokenizer candidate values against brute force (nats), a {args.dtype} teacher")
    engine = teachers.smollm2_engine(args.dtype)
    rows = []
    for student in args.students:
        cross = teachers.cross(student, "smollm2", engine)
        found, rng, started = CandidateCheck(), np.random.default_rng(0), time.monotonic()
        for index, (tokens, score_from, messages) in enumerate(rollouts(student, args.answers)):
            if index < args.skip:
                continue
            check_example(found, cross, engine, T.load("smollm2"), tokens, score_from, messages, rng, args.width)
            worst = " ".join(f"{kind} {max(found.diff[kind], default=0):.1e}" for kind in found.diff)
            print(
                f"# {student}: {index + 1} answers, {time.monotonic() - started:.0f} s; max |diff| {worst}",
                file=sys.stderr,
                flush=True,
            )
        summary = found.summary()
        common.emit({"student": student, **summary})
        for kind in ("on", "inside", "across"):
            rows.append({"student": student, "kind": kind, **summary[kind]})
        rows[-1]["impossible"] = f"{summary['impossible_agree']} agree, {summary['impossible_disagree']} not"
    columns = {"student": "student", "kind": "candidates", "n": "n", "mean": "mean |diff|", "p99": "p99", "max": "max"}
    common.print_table(rows, columns | {"share_over_tol": "share > 1e-4", "impossible": "-inf both sides"})
    common.footer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    engine = commands.add_parser("engine")
    engine.add_argument("--batch", type=int, default=4)
    engine.add_argument("--length", type=int, default=512)
    engine.add_argument("--top-k", type=int, default=32)
    engine.add_argument("--candidates", type=int, nargs="+", default=[0, 8, 32])
    engine.add_argument("--repeats", type=int, default=5)
    cross = commands.add_parser("cross")
    cross.add_argument("--students", nargs="+", default=["gpt2", "mistral-sp-v1", "tekken"])
    cross.add_argument("--answers", type=int, default=8)
    cross.add_argument("--candidates", type=int, nargs="+", default=[0, 8, 32])
    cross.add_argument("--repeats", type=int, default=3)
    exact = commands.add_parser("exact")
    exact.add_argument("--students", nargs="+", default=["mistral-sp-v1", "tekken", "gpt2"])
    exact.add_argument("--answers", type=int, default=100)
    exact.add_argument("--width", type=int, default=12)
    exact.add_argument("--skip", type=int, default=0, help="leave out the first SKIP answers (checked before)")
    exact.add_argument("--dtype", default="float32", help="the teacher's: float64 checks the algorithm alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"engine": engine_cost, "cross": cross_cost, "exact": exactness}[args.command](args)


if __name__ == "__main__":
    main()
