"""`opd-teacher serve`: run the teacher service."""

from __future__ import annotations

import argparse
import asyncio
import json

from teacher_server.auth import ApiKeys, KeyFileError
from teacher_server.engines import ENGINE_NAMES, EngineConfig
from teacher_server.engines.adapters import AdapterError
from teacher_server.logs import configure_logging
from teacher_server.scheduler import SchedulerLimits
from teacher_server.server import ServerConfig, serve
from teacher_server.teacher_specs import (
    TeacherSpec,
    TeacherSpecError,
    check_default,
    load_teachers_file,
    parse_teacher_flag,
    resolve_teachers,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-teacher", description="Teacher-as-a-service for on-policy distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve a teacher model over gRPC")
    # Defaults come from the config dataclasses (one source): the flags only name them.
    server, engine_defaults, limits = ServerConfig(), EngineConfig(model=""), SchedulerLimits()
    _serving_flags(run, server, engine_defaults, limits)
    _tenant_flags(run.add_argument_group("tenants, limits and security"), server, limits)
    _operations_flags(run.add_argument_group("operations"))
    _engine_flags(run.add_argument_group("vllm / sglang engines"), engine_defaults)
    return parser


def _serving_flags(
    run: argparse.ArgumentParser, server: ServerConfig, engine_defaults: EngineConfig, limits: SchedulerLimits
) -> None:
    teachers = run.add_mutually_exclusive_group(required=True)
    teachers.add_argument("--model", help="Hugging Face model directory or hub id (one teacher, named 'default')")
    teachers.add_argument(
        "--teacher",
        action="append",
        metavar="NAME=PATH",
        help="a teacher by name, repeatable: NAME=MODEL_PATH, or NAME=BASE_NAME+ADAPTER_DIR for a LoRA adapter "
        "over another teacher's model (its weights loaded once)",
    )
    teachers.add_argument(
        "--teachers", metavar="FILE", help="a YAML file of teachers with per-teacher engine options (README)"
    )
    run.add_argument("--default-teacher", help="the teacher of sessions that name none (default: the first)")
    run.add_argument("--tokenizer", help="the --model teacher's tokenizer (default: the model's)")
    run.add_argument("--host", default=server.host, help="address to listen on (0.0.0.0 for all)")
    run.add_argument("--port", type=int, default=server.port, help="port (0 picks a free one)")
    run.add_argument(
        "--http-port",
        type=int,
        default=server.http_port,
        help="also serve vLLM's /v1/completions and SGLang's /generate dialects over HTTP on this port "
        "(0 picks a free one; default: no HTTP)",
    )
    run.add_argument("--engine", choices=ENGINE_NAMES, default=server.engine)
    run.add_argument("--device", default=engine_defaults.device, help="cpu, cuda or cuda:N")
    run.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        default=engine_defaults.dtype,
        help="float64: an exact reference, slow (hf engine)",
    )
    run.add_argument("--max-k", type=int, default=server.max_k, help="largest top_k a request may ask for")
    run.add_argument(
        "--chunk-size", type=int, default=engine_defaults.chunk_size, help="positions per lm-head chunk (bounds memory)"
    )
    run.add_argument(
        "--max-batch-tokens", type=int, default=limits.max_batch_tokens, help="padded tokens per forward pass"
    )
    run.add_argument("--max-batch-size", type=int, default=limits.max_batch_size, help="sequences per forward pass")
    run.add_argument(
        "--max-batch-seconds",
        type=float,
        default=limits.max_batch_seconds,
        help="engine time one batch may take at the recent throughput (what a light tenant waits at most); 0: unbounded",
    )
    run.add_argument(
        "--max-queued-jobs", type=int, default=limits.max_queued_jobs, help="queued requests before RESOURCE_EXHAUSTED"
    )
    run.add_argument("--grace", type=float, default=server.grace_s, help="seconds in-flight requests get on shutdown")
    run.add_argument("--log-level", default="INFO")


def _tenant_flags(tenants: argparse._ArgumentGroup, server: ServerConfig, limits: SchedulerLimits) -> None:
    tenants.add_argument(
        "--api-keys",
        metavar="FILE",
        help="one 'TENANT KEY' per line; clients send 'authorization: Bearer KEY' "
        "(without it the server is open to anyone who can reach it)",
    )
    tenants.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain of the server (TLS)")
    tenants.add_argument("--tls-key", metavar="FILE", help="PEM private key of the server (TLS)")
    tenants.add_argument("--tls-client-ca", metavar="FILE", help="PEM CA bundle: require client certificates (mTLS)")
    limit_flags = (
        ("--quantum-tokens", limits.quantum_tokens, "tokens of fair-scheduling credit per tenant turn"),
        ("--max-tenant-queued-tokens", limits.max_tenant_queued_tokens, "tokens one tenant may have waiting"),
        ("--max-tenant-in-flight", limits.max_tenant_in_flight, "requests one tenant may have queued or running"),
        ("--max-request-tokens", limits.max_request_tokens, "tokens in one request"),
        ("--max-request-bytes", server.max_request_bytes, "bytes of a request message (Score: what its tokens need)"),
        ("--max-calls", server.max_calls, "Teacher calls in progress over all clients"),
        ("--max-tenant-calls", server.max_tenant_calls, "Teacher calls in progress of one tenant"),
        ("--max-sessions-per-tenant", server.max_sessions_per_tenant, "open sessions per tenant"),
        ("--max-alignment-work", server.max_alignment_work, "cross-tokenizer positions per request (default options)"),
        ("--max-table-mib", server.max_table_mib, "memory of all sessions' alignment tables"),
        ("--max-tenant-table-mib", server.max_tenant_table_mib, "memory of one tenant's sessions' alignment tables"),
    )
    for flag, default, meaning in limit_flags:  # past each: RESOURCE_EXHAUSTED (README, the limits' tables)
        tenants.add_argument(flag, type=int, default=default, help=meaning)


def _operations_flags(ops: argparse._ArgumentGroup) -> None:
    ops.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 picks a free one)")
    ops.add_argument(
        "--metrics-host",
        default=ServerConfig.metrics_host,
        help="address of the metrics endpoint (default 127.0.0.1; 0.0.0.0 exposes tenant names and traffic)",
    )
    ops.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line (structured logs)",
    )


def _engine_flags(engine: argparse._ArgumentGroup, engine_defaults: EngineConfig) -> None:
    engine.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=engine_defaults.tensor_parallel_size,
        help="GPUs the model is sharded over",
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=engine_defaults.gpu_memory_utilization,
        help="fraction of GPU memory the engine may take (sglang: mem_fraction_static)",
    )
    engine.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="prompt tokens per engine step; bounds the float32 [tokens, vocab] log-softmax "
        "of prompt logprobs (sglang: chunked_prefill_size)",
    )
    engine.add_argument(
        "--engine-args",
        type=json.loads,
        default={},
        help="further keyword arguments for vllm.LLM / sglang.Engine, as JSON, e.g. '{\"enforce_eager\": true}'",
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        api_keys = ApiKeys.load(args.api_keys) if args.api_keys else None
        config = server_config(args, api_keys)
        asyncio.run(serve(config))
    except (KeyFileError, TeacherSpecError, AdapterError) as error:
        raise SystemExit(f"opd-teacher: {error}") from None


def _teachers(args: argparse.Namespace) -> tuple[tuple[TeacherSpec, ...], str]:
    """(the teachers named by --teacher or --teachers, the default one); ((), "") for --model."""
    default = args.default_teacher or ""
    if args.teachers or args.teacher:  # both validate their list; the flag's default is checked here
        if args.teachers:
            specs, default_in_file = load_teachers_file(args.teachers)
        else:
            specs, default_in_file = resolve_teachers([parse_teacher_flag(value) for value in args.teacher]), ""
        if default:
            check_default(specs, default)
        return specs, default or default_in_file
    if default:
        raise TeacherSpecError("--default-teacher names one of the --teacher or --teachers teachers")
    return (), ""


def server_config(args: argparse.Namespace, api_keys: ApiKeys | None = None) -> ServerConfig:
    teachers, default_teacher = _teachers(args)
    dtypes = {args.dtype, *(spec.engine_options.get("dtype") for spec in teachers)}
    if "float64" in dtypes and args.engine != "hf":
        raise TeacherSpecError(f"dtype float64 (an exact reference) is the hf engine's, not {args.engine}'s")
    return ServerConfig(
        engine=args.engine,
        teachers=teachers,
        default_teacher=default_teacher,
        engine_config=EngineConfig(
            model=args.model or "",
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
            max_batch_seconds=args.max_batch_seconds,
            max_queued_jobs=args.max_queued_jobs,
            quantum_tokens=args.quantum_tokens,
            max_tenant_queued_tokens=args.max_tenant_queued_tokens,
            max_tenant_in_flight=args.max_tenant_in_flight,
            max_request_tokens=args.max_request_tokens,
        ),
        grace_s=args.grace,
        max_request_bytes=args.max_request_bytes,
        max_calls=args.max_calls,
        max_tenant_calls=args.max_tenant_calls,
        api_keys=api_keys,
        max_sessions_per_tenant=args.max_sessions_per_tenant,
        max_table_mib=args.max_table_mib,
        max_alignment_work=args.max_alignment_work,
        max_tenant_table_mib=args.max_tenant_table_mib,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
    )


if __name__ == "__main__":
    main()
