"""(c) Wire cost of score responses: encode/decode per MB, and the effect of splitting a response into chunks.

    python bench/wire.py codec [--positions 256 1024 4096 16384 65536] [--k 32]
    python bench/wire.py chunks [--positions 65536] [--chunk-rows 256 1024 4096 16384 0]

codec: one ScoreResponse of P positions with K=32 (ids int32 [P, K], logprobs float32 [P, K],
token_logprobs, mask, reason: 8K + 6 bytes per position), encoded the way the server does it
(teacher_server.servicer._response, then SerializeToString) and decoded the way the client does
it (ScoreResponse.FromString, then opd.tensors.from_tensor for each array), best of `--repeats`.

chunks: the same P positions sent from a gRPC server in another process over 127.0.0.1, as one
message or as a stream of messages of `--chunk-rows` positions each (0 = one message); the
server encodes each chunk when asked, the client decodes every chunk and concatenates the arrays.
Reported: wall time to the last array, time to the first chunk, MB/s. The teacher answers one
message per request today (proto/opd/v1/teacher.proto); this measures what chunking would change.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

import numpy as np  # noqa: E402

METHOD = "/opd.bench.Wire/Fetch"


def output(positions: int, k: int, seed: int = 0):
    from teacher_server.alignment.result import Coverage, ScoreResult

    rng = np.random.default_rng(seed)
    return ScoreResult(
        ids=rng.integers(0, 152064, size=(positions, k)).astype(np.int32),
        logprobs=-rng.random((positions, k), dtype=np.float32) * 20,
        token_logprobs=-rng.random(positions, dtype=np.float32),
        mask=np.ones(positions, dtype=np.uint8),
        reason=np.zeros(positions, dtype=np.uint8),
        counts=Coverage(positions=positions, with_distribution=positions, retained_mass_sum=0.9 * positions),
    )


def encode(out) -> bytes:
    from teacher_server.servicer import _response

    return _response(1, out).SerializeToString()


def decode(data: bytes) -> tuple[np.ndarray, ...]:
    from opd.tensors import from_tensor
    from opd.v1 import teacher_pb2

    reply = teacher_pb2.ScoreResponse.FromString(data)
    return (
        from_tensor(reply.ids, name="ids", dtype="int32", ndim=2),
        from_tensor(reply.logprobs, name="logprobs", dtype="float32", ndim=2),
        from_tensor(reply.token_logprobs, name="token_logprobs", dtype="float32", ndim=1),
        from_tensor(reply.mask, name="mask", dtype="uint8", ndim=1),
        from_tensor(reply.reason, name="reason", dtype="uint8", ndim=1),
    )


def codec(args) -> None:
    common.header(f"(c) ScoreResponse encode/decode, K={args.k}")
    rows = []
    for positions in args.positions:
        out = output(positions, args.k)
        data = encode(out)
        best = common.interleaved_best({"encode": lambda: encode(out), "decode": lambda: decode(data)}, args.repeats)
        mb = len(data) / 1e6
        row = {
            "positions": positions,
            "mb": mb,
            "encode_ms": best["encode"]["seconds"] * 1e3,
            "decode_ms": best["decode"]["seconds"] * 1e3,
            "encode_ms_per_mb": best["encode"]["seconds"] * 1e3 / mb,
            "decode_ms_per_mb": best["decode"]["seconds"] * 1e3 / mb,
        }
        rows.append(row)
        common.emit({"bench": "wire_codec", "k": args.k, **row, "load_average": common.load_average()})
    common.print_table(
        rows,
        {
            "positions": "positions",
            "mb": "MB",
            "encode_ms": "encode ms",
            "decode_ms": "decode ms",
            "encode_ms_per_mb": "encode ms/MB",
            "decode_ms_per_mb": "decode ms/MB",
        },
    )
    common.footer()


# ------------------------------------------------------------------------------ chunks


def serve(port: int, positions: int, k: int) -> None:
    """A gRPC server with one unary-stream method: request = chunk rows (ascii), reply = encoded chunks."""
    import grpc

    from teacher_server.alignment.result import ScoreResult

    full = output(positions, k)

    async def fetch(request: bytes, context):
        rows = int(request) or positions
        for start in range(0, positions, rows):
            part = ScoreResult(
                full.ids[start : start + rows],
                full.logprobs[start : start + rows],
                full.token_logprobs[start : start + rows],
                full.mask[start : start + rows],
                full.reason[start : start + rows],
                full.counts,
            )
            yield encode(part)

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30)])
        handler = grpc.method_handlers_generic_handler(
            "opd.bench.Wire", {"Fetch": grpc.unary_stream_rpc_method_handler(fetch)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def fetch_once(target: str, chunk_rows: int) -> dict:
    import grpc

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        call = channel.unary_stream(METHOD)
        started = time.perf_counter()
        first, parts, size = None, [], 0
        async for data in call(str(chunk_rows).encode()):
            first = first or time.perf_counter() - started
            size += len(data)
            parts.append(decode(data))
        arrays = [np.concatenate(column) if len(parts) > 1 else column[0] for column in zip(*parts)]
        seconds = time.perf_counter() - started
    assert arrays[0].shape[0] == sum(p[0].shape[0] for p in parts)
    return {"seconds": seconds, "first_s": first, "bytes": size, "messages": len(parts)}


def chunks(args) -> None:
    common.header(f"(c) one response of {args.positions} positions (K={args.k}) over loopback gRPC, chunked")
    port = common.launch.free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", str(port), str(args.positions), str(args.k)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        target = f"127.0.0.1:{port}"
        results = {rows: [] for rows in args.chunk_rows}
        for _ in range(args.repeats):  # chunk sizes take turns
            for rows in args.chunk_rows:
                results[rows].append(asyncio.run(fetch_once(target, rows)))
    finally:
        server.terminate()
        server.wait()
    table = []
    for rows, samples in results.items():
        best = min(samples, key=lambda r: r["seconds"])
        row = {
            "chunk_rows": rows or args.positions,
            "messages": best["messages"],
            "chunk_mb": best["bytes"] / best["messages"] / 1e6,
            "seconds": best["seconds"],
            "first_ms": best["first_s"] * 1e3,
            "mb_per_s": best["bytes"] / 1e6 / best["seconds"],
        }
        table.append(row)
        common.emit(
            {
                "bench": "wire_chunks",
                "positions": args.positions,
                "k": args.k,
                **row,
                "load_average": common.load_average(),
            }
        )
    common.print_table(
        table,
        {
            "chunk_rows": "positions per message",
            "messages": "messages",
            "chunk_mb": "MB each",
            "seconds": "total s",
            "first_ms": "first message ms",
            "mb_per_s": "MB/s",
        },
    )
    common.footer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("codec")
    c.add_argument("--positions", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    c.add_argument("--k", type=int, default=32)
    c.add_argument("--repeats", type=int, default=5)
    s = commands.add_parser("chunks")
    s.add_argument("--positions", type=int, default=65536)
    s.add_argument("--chunk-rows", type=int, nargs="+", default=[256, 1024, 4096, 16384, 0])
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    srv = commands.add_parser("serve")
    srv.add_argument("port", type=int)
    srv.add_argument("positions", type=int)
    srv.add_argument("k", type=int)
    args = parser.parse_args()
    {"codec": codec, "chunks": chunks, "serve": lambda a: serve(a.port, a.positions, a.k)}[args.command](args)


if __name__ == "__main__":
    main()
