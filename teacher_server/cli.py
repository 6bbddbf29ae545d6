"""`opd-teacher serve`: run the teacher service."""

from __future__ import annotations

import argparse
import asyncio
import logging

from teacher_server.engines import ENGINE_NAMES, EngineConfig
from teacher_server.scheduler import SchedulerLimits
from teacher_server.server import ServerConfig, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-teacher", description="Teacher-as-a-service for on-policy distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve a teacher model over gRPC")
    run.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    run.add_argument("--tokenizer", help="the teacher's tokenizer (default: the model's)")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    run.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    run.add_argument("--engine", choices=ENGINE_NAMES, default="hf")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--max-k", type=int, default=64, help="largest top_k a request may ask for")
    run.add_argument("--chunk-size", type=int, default=256, help="positions per lm-head chunk (bounds memory)")
    run.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    run.add_argument("--max-batch-size", type=int, default=64, help="sequences per forward pass")
    run.add_argument("--max-queued-jobs", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    run.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on shutdown")
    run.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        engine=args.engine,
        engine_config=EngineConfig(model=args.model, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size),
        tokenizer=args.tokenizer,
        host=args.host,
        port=args.port,
        max_k=args.max_k,
        limits=SchedulerLimits(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_size=args.max_batch_size,
            max_queued_jobs=args.max_queued_jobs,
        ),
        grace_s=args.grace,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
