"""`opd-train`: on-policy distillation of a student against a running teacher service."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from student_trainer.config import LOSSES, PARALLELISMS, ROLLOUT_ENGINES, TrainConfig, load_config
from student_trainer.train import train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-train",
        description="Train a student with teacher top-K local support matching against an opd-teacher service. "
        "Flags override --config; every config key (see student_trainer/config.py) can be set in the YAML file.",
    )
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    parser.add_argument("--student", help="student model directory (Hugging Face format)")
    parser.add_argument(
        "--teacher", help="HOST:PORT of the teacher service, a comma-separated list, or dns:///NAME:PORT"
    )
    parser.add_argument(
        "--teacher-endpoint",
        "--teacher-endpoints",
        dest="teacher_endpoints",
        action="append",
        type=_endpoint,
        metavar="NAME=HOST:PORT",
        help="a teacher the prompts name that another deployment serves (repeatable)",
    )
    parser.add_argument(
        "--teacher-api-key-file", help="file with this trainer's API key (default: $OPD_TEACHER_API_KEY)"
    )
    parser.add_argument("--teacher-tls", action="store_true", default=None, help="TLS with the system's CA roots")
    parser.add_argument("--teacher-tls-ca", help="PEM CA that signed the teacher's certificate (implies TLS)")
    parser.add_argument("--teacher-tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--teacher-tls-key", help="PEM client key (mutual TLS)")
    parser.add_argument("--teacher-tls-server-name", help="name to check the teacher's certificate against")
    parser.add_argument(
        "--pin-teacher",
        action="store_true",
        default=None,
        help="refuse a teacher whose model or weights change (a silent swap)",
    )
    parser.add_argument("--prompts", help="JSONL of {'prompt': ...} or {'messages': [...]}")
    parser.add_argument("--eval-prompts", help="held-out prompts (JSONL) for the reverse-KL evaluation")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--output", help="output directory: metrics.jsonl, checkpoints/")
    parser.add_argument("--loss", choices=LOSSES)
    parser.add_argument("--top-k", type=int)
    parser.add_argument(
        "--candidates", type=int, help="the student's top-M ids the teacher scores too (union support; 0: none)"
    )
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--gamma", type=float, help="sampled_token loss: reward-to-go discount in [0, 1]")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda (under torchrun: each rank's own GPU) or cuda:N")
    parser.add_argument("--parallelism", choices=PARALLELISMS, help="under torchrun: ddp (default) or fsdp")
    parser.add_argument("--rollout-engine", choices=ROLLOUT_ENGINES, help="hf (default) or vllm (colocated)")
    parser.add_argument("--rollout-sync-every", type=int, help="vllm: push the weights every N steps (default 1)")
    parser.add_argument(
        "--max-staleness",
        type=int,
        help="policy lag allowed: batches sampled ahead while the teacher scores them (default 0: synchronous)",
    )
    parser.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank (0: the whole model)")
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument(
        "--lora-target-modules",
        type=lambda text: text.split(","),
        help="comma-separated module names, e.g. q_proj,v_proj (default: all-linear)",
    )
    _add_remaining_keys(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def _endpoint(text: str) -> tuple[str, str]:
    name, _, target = text.partition("=")
    if not name or not target:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, target


def _add_remaining_keys(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig key is a flag: those not declared above get a plain one (default None:
    the config's value stands)."""
    declared = {action.dest for action in parser._actions}
    defaults = TrainConfig()
    for key in dataclasses.fields(TrainConfig):
        if key.name in declared:
            continue
        flag, default = "--" + key.name.replace("_", "-"), getattr(defaults, key.name)
        described = f"TrainConfig.{key.name} (default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=described)
        elif isinstance(default, list):
            parser.add_argument(flag, type=lambda text: text.split(","), help=f"comma-separated; {described}")
        else:
            parser.add_argument(flag, type=type(default), help=described)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """The training config and whether to resume, from the command line (SystemExit if invalid)."""
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=args.pop("log_level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, resume = args.pop("config"), args.pop("resume")
    if args["teacher_endpoints"] is not None:
        args["teacher_endpoints"] = dict(args["teacher_endpoints"])
    try:
        return load_config(config_path, **args), resume
    except ValueError as error:
        raise SystemExit(f"opd-train: {error}") from None


def main(argv: list[str] | None = None) -> None:
    config, resume = parse(argv)
    records = train(config, resume=resume)
    if records and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per rank
        last = records[-1]
        summary = ", ".join(
            f"{name}={last[name]:.4f}" for name in ("loss", "topk_rkl", "eval_topk_rkl") if name in last
        )
        print(f"finished step {last['step']}: {summary}; metrics in {config.output}/metrics.jsonl")


if __name__ == "__main__":
    main()
