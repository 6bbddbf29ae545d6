"""`opd-teacher serve`: run the teacher service."""

from __future__ import annotations

import argparse
import asyncio
import json

from teacher_server.auth import ApiKeys, KeyFileError
from teacher_server.engines import ENGINE_NAMES, EngineConfig
from teacher_server.logs import configure_logging
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
    tenants = run.add_argument_group("tenants, limits and security")
    tenants.add_argument("--api-keys", metavar="FILE",
                         help="one 'TENANT KEY' per line; clients send 'authorization: Bearer KEY' "
                              "(without it the server is open to anyone who can reach it)")
    tenants.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain of the server (TLS)")
    tenants.add_argument("--tls-key", metavar="FILE", help="PEM private key of the server (TLS)")
    tenants.add_argument("--tls-client-ca", metavar="FILE", help="PEM CA bundle: require client certificates (mTLS)")
    tenants.add_argument("--quantum-tokens", type=int, default=256,
                         help="fair-scheduling credit per tenant turn, in tokens (deficit round robin)")
    tenants.add_argument("--max-tenant-queued-tokens", type=int, default=262_144,
                         help="tokens one tenant may have waiting before RESOURCE_EXHAUSTED")
    tenants.add_argument("--max-tenant-in-flight", type=int, default=512,
                         help="requests one tenant may have queued or running before RESOURCE_EXHAUSTED")
    tenants.add_argument("--max-request-tokens", type=int, default=65_536, help="tokens in one request")
    tenants.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024, help="bytes in one request message")
    tenants.add_argument("--max-sessions-per-tenant", type=int, default=64, help="open sessions per tenant")
    ops = run.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 picks a free one)")
    ops.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")
    ops.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="json: one JSON object per line (structured logs)")
    engine = run.add_argument_group("vllm / sglang engines")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is sharded over")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may take (sglang: mem_fraction_static)")
    engine.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    engine.add_argument("--max-num-batched-tokens", type=int,
                        help="prompt tokens per engine step; bounds the float32 [tokens, vocab] log-softmax "
                             "of prompt logprobs (sglang: chunked_prefill_size)")
    engine.add_argument("--engine-args", type=json.loads, default={},
                        help='further keyword arguments for vllm.LLM / sglang.Engine, as JSON, e.g. \'{"enforce_eager": true}\'')
    run.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        api_keys = ApiKeys.load(args.api_keys) if args.api_keys else None
    except KeyFileError as error:
        raise SystemExit(f"opd-teacher: {error}") from None
    config = ServerConfig(
        engine=args.engine,
        engine_config=EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            chunk_size=args.chunk_size,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            engine_args=args.engine_args,
        ),
        tokenizer=args.tokenizer,
        host=args.host,
        port=args.port,
        max_k=args.max_k,
        limits=SchedulerLimits(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_size=args.max_batch_size,
            max_queued_jobs=args.max_queued_jobs,
            quantum_tokens=args.quantum_tokens,
            max_tenant_queued_tokens=args.max_tenant_queued_tokens,
            max_tenant_in_flight=args.max_tenant_in_flight,
            max_request_tokens=args.max_request_tokens,
        ),
        grace_s=args.grace,
        max_request_bytes=args.max_request_bytes,
        api_keys=api_keys,
        max_sessions_per_tenant=args.max_sessions_per_tenant,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
