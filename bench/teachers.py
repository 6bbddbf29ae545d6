"""Several teachers in one server (issue 17): what an adapter teacher costs in memory, and how
two tenants on two teachers of different cost share the device.

    python bench/teachers.py memory
    python bench/teachers.py fairness [--seconds 30]

memory: `opd-teacher serve` with SmolLM2-135M alone, then with one and two LoRA adapters over it
(rank 16 on every projection, random, built once here); the serving process's RSS once SERVING
and each teacher's `opd_teacher_memory_bytes`, against the adapters' size on disk.

fairness: one server, two teachers (SmolLM2-135M, "big", and the tests' tiny Llama, "small": each
token of "big" costs the device far more), API keys, one torch thread. Two tenants of equal
demand (each keeps 8 requests of 128 tokens in flight, tenant A on "big", tenant B on "small")
for `--seconds`: positions scored and engine seconds used by each (opd_engine_seconds_total),
and the Jain index of each pair (1 = equal). Then a
light tenant scoring 64 tokens one request at a time: its median latency unloaded and while a
tenant floods the other teacher (16 requests of `--flood-tokens` in flight), both ways round.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import CACHE, emit, footer, header, print_table, rss_mib, smollm2_model, tiny_model  # noqa: E402
from teacher_server.launch import TeacherProcess, free_port, threads  # noqa: E402

KEYS = {"A": "tenant-a-key-0123456789abcdef", "B": "tenant-b-key-0123456789abcdef"}


def adapter(base: Path, seed: int) -> Path:
    """A rank-16 LoRA adapter on every projection of `base`, random (cached)."""
    path = CACHE / f"bench-smollm2-lora{seed}"
    if not (path / "adapter_config.json").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=16, target_modules=projections, init_lora_weights=False),
        )
        model.save_pretrained(path)
    return path


def metric(port: int, name: str, label: str) -> dict[str, float]:
    """One metric's samples summed by the value of their `label`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            key = re.search(f'{label}="([^"]*)"', line).group(1)
            values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def memory() -> None:
    base = smollm2_model()
    adapters = [adapter(base, seed) for seed in (1, 2)]
    size = [sum(f.stat().st_size for f in path.iterdir()) / 2**20 for path in adapters]
    rows = []
    for count in range(3):
        flags = ["--teacher", f"base={base}"]
        for index in range(count):
            flags += ["--teacher", f"lora{index}=base+{adapters[index]}"]
        port = free_port()
        with TeacherProcess(None, extra=(*flags, "--metrics-port", str(port)), env=threads(1), timeout_s=600) as t:
            time.sleep(2.0)
            grown = metric(port, "opd_teacher_memory_bytes", "teacher")
            rows.append(
                {
                    "teachers": "base" + "".join(f" + lora{i}" for i in range(count)),
                    "rss_mib": rss_mib(t.pid),
                    "added_by_each_mib": " / ".join(f"{name} {value / 2**20:.0f}" for name, value in grown.items()),
                }
            )
            emit(rows[-1])
    for row in rows:
        row["growth_over_base_mib"] = row["rss_mib"] - rows[0]["rss_mib"]
    print_table(rows, ["teachers", "rss_mib", "growth_over_base_mib", "added_by_each_mib"])
    print(f"adapter size on disk: {size[0]:.1f} MiB and {size[1]:.1f} MiB (SmolLM2-135M float32: ~540 MiB)")


async def flood(target: str, key: str, teacher: str, tokens: int, in_flight: int, until: float) -> list[float]:
    """Keep `in_flight` requests of `tokens` tokens to `teacher` until `until`; their latencies."""
    import grpc

    from opd.tensors import to_tensor
    from opd.v1 import teacher_pb2, teacher_pb2_grpc

    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        same = teacher_pb2.StudentTokenizer(same_as_teacher=True)
        opened = await stub.OpenSession(
            teacher_pb2.OpenSessionRequest(tokenizer=same, teacher=teacher), metadata=metadata
        )
        rng = np.random.default_rng(len(teacher) + tokens)
        latencies: list[float] = []

        async def one_at_a_time() -> None:
            while time.monotonic() < until:
                ids = rng.integers(4, 90, tokens).astype(np.int32)
                request = teacher_pb2.ScoreRequest(
                    session_id=opened.session_id, tokens=to_tensor(ids), score_from=1, top_k=8
                )
                started = time.monotonic()
                await stub.Score(request, metadata=metadata, timeout=120)
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(one_at_a_time() for _ in range(in_flight)))
        return latencies


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def fairness(seconds: float, flood_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text("".join(f"{tenant} {key}\n" for tenant, key in KEYS.items()))
        port = free_port()
        flags = ("--teacher", f"big={smollm2_model()}", "--teacher", f"small={tiny_model()}", "--api-keys", str(keys))
        flags += ("--metrics-port", str(port))
        with TeacherProcess(None, extra=flags, env=threads(1), timeout_s=600) as teacher:
            busy = metric(port, "opd_engine_seconds_total", "tenant")
            shares = asyncio.run(_equal_demand(teacher.target, seconds))
            busy = {
                tenant: value - busy.get(tenant, 0.0)
                for tenant, value in metric(port, "opd_engine_seconds_total", "tenant").items()
            }
            tokens = [len(latencies) * 127 / seconds for latencies in shares.values()]
            engine_s = [busy.get(tenant, 0.0) for tenant in shares]
            emit({"positions_per_s": dict(zip(shares, tokens)), "engine_s": dict(zip(shares, engine_s))})
            print(
                f"equal demand, {seconds:.0f} s: positions/s A (big) {tokens[0]:.0f}, B (small) {tokens[1]:.0f}, "
                f"Jain index {jain(tokens):.3f}; engine seconds A {engine_s[0]:.1f}, B {engine_s[1]:.1f}, "
                f"Jain index {jain(engine_s):.3f}"
            )
            rows = []
            for light, heavy in (("small", "big"), ("big", "small")):
                alone = asyncio.run(flood(teacher.target, KEYS["A"], light, 64, 1, time.monotonic() + seconds / 2))
                loaded = asyncio.run(_light_beside_flood(teacher.target, light, heavy, seconds / 2, flood_tokens))
                row = {
                    "light_on": light,
                    "flood_on": f"{heavy} ({flood_tokens} tokens)",
                    "unloaded_median_ms": 1e3 * float(np.median(alone)),
                    "loaded_median_ms": 1e3 * float(np.median(loaded)),
                }
                row["ratio"] = row["loaded_median_ms"] / row["unloaded_median_ms"]
                rows.append(row)
                emit(row)
            print_table(rows, ["light_on", "flood_on", "unloaded_median_ms", "loaded_median_ms", "ratio"])


async def _equal_demand(target: str, seconds: float) -> dict[str, list[float]]:
    until = time.monotonic() + seconds
    big, small = await asyncio.gather(
        flood(target, KEYS["A"], "big", 128, 8, until), flood(target, KEYS["B"], "small", 128, 8, until)
    )
    return {"A": big, "B": small}


async def _light_beside_flood(target: str, light: str, heavy: str, seconds: float, tokens: int) -> list[float]:
    until = time.monotonic() + seconds
    latencies, _ = await asyncio.gather(
        flood(target, KEYS["A"], light, 64, 1, until), flood(target, KEYS["B"], heavy, tokens, 16, until)
    )
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "fairness"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--flood-tokens", type=int, default=512, help="fairness: tokens of each flooding request")
    args = parser.parse_args()
    header(f"several teachers in one server: {args.what}")
    memory() if args.what == "memory" else fairness(args.seconds, args.flood_tokens)
    footer()


if __name__ == "__main__":
    main()
