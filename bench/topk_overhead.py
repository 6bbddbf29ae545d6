"""(b) Top-K extraction overhead against a plain logits forward, and peak memory against length.

    python bench/topk_overhead.py overhead [--batch 4 --length 512 --repeats 5]
    python bench/topk_overhead.py memory [--lengths 1024 4096 16384 --vocab 152064]

overhead: SmolLM2-135M float32, K=32, one batch of `--batch` rollouts of `--length` tokens
(random ids, scored from position 1), timed in turns (best of `--repeats`, every variant once
per round) in this one process, plus one gRPC server subprocess:

  forward-all   the model's own forward: logits [B, T, V] for every position (reference)
  logits        the least any scorer must compute: the backbone once, then the lm head on the
                scored rows only, returning their logits [P, V] (one matmul per rollout)
  naive         logits per chunk of 256 rows, log_softmax, torch.topk, gather of the targets
  engine        HFEngine.score (teacher_server/engines/hf.py), the session's special tokens excluded
  grpc          the same rollouts sent at once by `--batch` clients to `opd-teacher serve` (hf
                engine, one subprocess), decoded; what a trainer sees ("top-K + transport")

It also checks that engine and naive agree (same ids, log-probs within 1e-4).

memory: a random 2-layer Llama (d=128) with a `--vocab` vocabulary (152064 = Qwen2's), one
rollout of each length scored from position 1 with K=32; each length in a fresh subprocess, peak
RSS (VmHWM) reported above the RSS after loading. For contrast, `logits` (the plain forward that
returns [T, V] float32) at the lengths where it fits in `--logits-limit-gib`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from teacher_server.engines.hf import HFEngine

K = 32


@torch.inference_mode()
def plain_logits(engine, input_ids: torch.Tensor, starts: list[int]) -> list[torch.Tensor]:
    """Backbone once, lm head on the scored rows of each rollout: [P, V] logits each."""
    hidden = engine.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    return [engine.lm_head(hidden[row, start - 1 : input_ids.shape[1] - 1]) for row, start in enumerate(starts)]


@torch.inference_mode()
def naive_scores(engine, input_ids: torch.Tensor, starts: list[int], chunk: int = 256) -> list[tuple]:
    """Chunked log_softmax + torch.topk + gather: the straightforward scorer."""
    hidden = engine.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    results = []
    for row, start in enumerate(starts):
        rows = hidden[row, start - 1 : input_ids.shape[1] - 1]
        targets = input_ids[row, start:]
        ids, logprobs, token_logprobs = [], [], []
        for begin in range(0, rows.shape[0], chunk):
            logp = torch.log_softmax(engine.lm_head(rows[begin : begin + chunk]).float(), dim=-1)
            values, top = logp.topk(K, dim=-1)
            ids.append(top)
            logprobs.append(values)
            token_logprobs.append(logp.gather(-1, targets[begin : begin + chunk, None]).squeeze(-1))
        results.append((torch.cat(ids).numpy(), torch.cat(logprobs).numpy(), torch.cat(token_logprobs).numpy()))
    return results


def overhead(args) -> None:
    from teacher_server.engines import EngineConfig
    from teacher_server.engines.hf import HFEngine

    common.header(f"(b) top-K overhead: SmolLM2-135M float32, K={K}, {args.batch} x {args.length} tokens")
    model = common.smollm2_model()
    engine = HFEngine(EngineConfig(model=str(model)))
    rng = np.random.default_rng(0)
    sequences = rng.integers(4, engine.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    check_engine_against_naive(engine, sequences)
    threads = torch.get_num_threads()
    best = time_variants(engine, model, sequences, threads, args)
    positions = args.batch * (args.length - 1)
    rows = []
    for name, times in best.items():
        row = {
            "variant": name,
            **times,
            "positions_per_s": positions / times["seconds"],
            "positions_per_cpu_s": positions / times["cpu_s"],
            "wall_vs_logits": times["seconds"] / best["logits"]["seconds"] - 1.0,
            "cpu_vs_logits": times["cpu_s"] / best["logits"]["cpu_s"] - 1.0,
        }
        rows.append(row)
        common.emit(
            {
                "bench": "topk_overhead",
                "batch": args.batch,
                "length": args.length,
                "threads": threads,
                **row,
                "load_average": common.load_average(),
            }
        )
    common.print_table(
        rows,
        {
            "variant": "variant",
            "seconds": "best wall s",
            "positions_per_s": "scored pos/s",
            "wall_vs_logits": "wall over `logits`",
            "cpu_s": "best CPU s",
            "positions_per_cpu_s": "pos per CPU-s",
            "cpu_vs_logits": "CPU over `logits`",
        },
        f"{args.batch} x {args.length} tokens, best of {args.repeats} interleaved rounds "
        "(CPU: all threads; grpc: server + client):",
    )
    common.footer()


def check_engine_against_naive(engine: HFEngine, sequences: np.ndarray) -> None:
    """Engine and the naive float32 path, nothing excluded in either: same ids, log-probs within 1e-4."""
    from teacher_server.engines import ScoringJob

    input_ids = torch.from_numpy(sequences.astype(np.int64))
    jobs = [ScoringJob(s, 1, K) for s in sequences]
    naive = naive_scores(engine, input_ids, [1] * len(sequences))
    for (ids, logprobs, token_logprobs), got in zip(naive, engine.score(jobs)):
        same = float((ids == got.ids).mean())
        worst = float(max(np.abs(logprobs - got.logprobs).max(), np.abs(token_logprobs - got.token_logprobs).max()))
        common.emit({"bench": "topk_overhead", "check": "engine vs naive", "same_ids": same, "max_abs_logprob": worst})
        assert same > 0.999 and worst < 1e-4, (same, worst)


def time_variants(engine: HFEngine, model: Path, sequences: np.ndarray, threads: int, args) -> dict[str, dict]:
    """Best wall and CPU seconds of every variant (the module docstring's list), taking turns."""
    from bench.scoring import session_exclusions
    from teacher_server.engines import ScoringJob

    input_ids = torch.from_numpy(sequences.astype(np.int64))
    starts = [1] * args.batch
    exclude = session_exclusions(str(model), engine.vocab_size, engine.max_sequence_length)
    session_jobs = [ScoringJob(s, 1, K, exclude_ids=exclude) for s in sequences]
    server = common.TeacherProcess(
        model,
        extra=["--engine", "hf", "--max-k", str(K)],
        env=common.engine_env(threads),
        log=Path(args.logs) / "topk-overhead-server.log",
    )
    try:

        def grpc_round() -> dict:
            # --batch clients, one rollout each, at once: the scheduler batches them.
            return asyncio.run(
                common.grpc_score(server.target, list(sequences), 1, K, args.batch, server_pid=server.pid)
            )

        variants = {
            "forward-all": lambda: engine.model(input_ids=input_ids, use_cache=False).logits,
            "logits": lambda: plain_logits(engine, input_ids, starts),
            "naive": lambda: naive_scores(engine, input_ids, starts),
            "engine": lambda: engine.score(session_jobs),
            "grpc": grpc_round,
        }
        with torch.inference_mode():  # forward-all; the others run under it themselves
            return common.interleaved_best(variants, args.repeats)
    finally:
        server.close()


# ------------------------------------------------------------------------------ memory


def build_wide_vocab_model(vocab: int, hidden: int = 128) -> Path:
    path = common.CACHE / f"bench-llama-v{vocab}-d{hidden}"
    if not (path / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=hidden // 32,
            num_key_value_heads=hidden // 32,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
        staging = path.with_name(path.name + f".tmp{os.getpid()}")
        LlamaForCausalLM(config).save_pretrained(staging)
        os.replace(staging, path)
    return path


def memory_child(variant: str, model: str, length: int) -> None:
    """One measurement in a fresh process: prints one JSON line."""
    import time

    from teacher_server.engines import EngineConfig, ScoringJob
    from teacher_server.engines.hf import HFEngine

    engine = HFEngine(EngineConfig(model=model))
    ids = np.random.default_rng(0).integers(0, engine.vocab_size, size=length).astype(np.int32)
    idle = common.rss_mib()
    common.reset_peak_rss()
    started = time.perf_counter()
    with torch.inference_mode():
        if variant == "engine":
            engine.score([ScoringJob(ids, 1, K)])
        else:
            plain_logits(engine, torch.from_numpy(ids.astype(np.int64))[None], [1])
    seconds = time.perf_counter() - started
    print(json.dumps({"idle_rss_mib": idle, "peak_rss_mib": common.peak_rss_mib(), "seconds": seconds}))


def memory(args) -> None:
    common.header(f"(b) peak memory against rollout length, vocabulary {args.vocab}, K={K}")
    model = build_wide_vocab_model(args.vocab)
    rows = []
    for length in args.lengths:
        for variant in ("engine", "logits"):
            logits_gib = length * args.vocab * 4 / 2**30
            if variant == "logits" and logits_gib > args.logits_limit_gib:
                common.emit(
                    {
                        "bench": "topk_memory",
                        "variant": variant,
                        "length": length,
                        "skipped": f"[T, V] float32 logits alone are {logits_gib:.1f} GiB",
                    }
                )
                continue
            command = [sys.executable, __file__, "memory-child", variant, str(model), str(length)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            row = {
                "variant": variant,
                "length": length,
                "vocab": args.vocab,
                **result,
                "extra_mib": result["peak_rss_mib"] - result["idle_rss_mib"],
            }
            rows.append(row)
            common.emit({"bench": "topk_memory", **row, "load_average": common.load_average()})
    common.print_table(
        rows,
        {
            "variant": "variant",
            "length": "rollout tokens",
            "idle_rss_mib": "RSS loaded MiB",
            "peak_rss_mib": "peak RSS MiB",
            "extra_mib": "peak above loaded MiB",
            "seconds": "seconds",
        },
    )
    common.footer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead")
    over.add_argument("--batch", type=int, default=4)
    over.add_argument("--length", type=int, default=512)
    over.add_argument("--repeats", type=int, default=5)
    over.add_argument("--logs", default="outputs/bench")
    mem = commands.add_parser("memory")
    mem.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    mem.add_argument("--vocab", type=int, default=152064)
    mem.add_argument("--logits-limit-gib", type=float, default=4.0)
    child = commands.add_parser("memory-child")
    child.add_argument("variant")
    child.add_argument("model")
    child.add_argument("length", type=int)
    args = parser.parse_args()
    if args.command == "memory-child":
        memory_child(args.variant, args.model, args.length)
    elif args.command == "memory":
        memory(args)
    else:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        overhead(args)


if __name__ == "__main__":
    main()
