"""(h) One training step of the student at a large vocabulary: the [B, P, V] path against head.py.

    python bench/trainer.py                                  # V=152064, H=64, P = 2048 8192 16384
    python bench/trainer.py --lengths 2048 --paths head --loss sampled_token

One rollout of P scored positions after a 16-token prompt; a 2-layer Llama-shaped student with a
small hidden size H and Qwen2's vocabulary (tied embeddings, as Qwen2.5-0.5B), built from a config;
K = 32 teacher support entries per position. One step = forward, loss, backward, timed in a fresh
subprocess per (path, P):

  full   the trainer's path before head.py (testkit/full_vocabulary.py): the model's logits at
         every scored position, [B, P, V], then gathered, logsumexp'd and top-k'd by autograd
  head   the trainer's path now (batch.student_scores): final hidden states, the student's logits
         at the K support ids and the target only, the vocabulary reductions in blocks of positions

--packing measures the step (head path) on rollouts of mixed lengths, padded against packed
(batch.collate's two layouts), best of --repeats, the two taking turns: 8 rollouts with
completions of 32 to 1024 tokens, a 4-layer student of hidden size 256 with SmolLM2's vocabulary.

"step peak MiB" is the subprocess's peak RSS (VmHWM) above its RSS once the model and the batch
are loaded: everything the step allocates, the parameters' gradients included ([V, H] for the
tied embedding). A child is given an address-space limit (--memory-limit-gib) so that a path that
does not fit fails with an allocation error instead of taking the machine down; such a row says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import torch  # noqa: E402

from student_trainer.batch import collate, student_scores  # noqa: E402
from student_trainer.config import LOSSES, TrainConfig  # noqa: E402
from student_trainer.step import per_position_loss  # noqa: E402
from testkit.full_vocabulary import full_vocabulary_scores, synthetic_batch, synthetic_rollouts  # noqa: E402

PATHS = ("full", "head")
PROMPT = 16


def student(vocab: int, hidden: int, context: int, layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        head_dim=32,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def child(args: argparse.Namespace) -> None:
    limit = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    before = common.rss_mib()
    model = student(args.vocab, args.hidden, PROMPT + args.length + 1)
    batch = synthetic_batch(args.vocab, lengths=[(PROMPT, args.length)], top_k=args.k, padding_share=0.0)
    config = TrainConfig(student="s", prompts="p", loss=args.loss)
    loaded = common.rss_mib()
    common.reset_peak_rss()
    scores_of = full_vocabulary_scores if args.child == "full" else student_scores
    started = time.perf_counter()
    try:
        if args.child == "full":
            scores = scores_of(model, batch)
        else:
            scores = student_scores(model, batch, log_norm_gradient=args.loss != "topk_rkl")
        loss, _ = per_position_loss(config, scores, batch)
        (loss.sum() / batch.mask.sum()).backward()
    except RuntimeError as error:  # the address-space limit: an allocation that did not fit
        print(json.dumps({"error": f"out of memory under {args.memory_limit_gib:g} GiB: {str(error)[:120]}"}))
        return
    seconds = time.perf_counter() - started
    peak = common.peak_rss_mib()
    record = {"seconds": seconds, "model_and_batch_mib": loaded - before, "step_peak_mib": peak - loaded}
    print(json.dumps(record | {"tokens_per_s": args.length / seconds}))


def measure_in_child(path: str, length: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", path, "--lengths", str(length)]
    for name in ("vocab", "hidden", "k", "loss", "memory_limit_gib"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        return {"error": f"exit {result.returncode}: {result.stderr.strip()[-200:]}"}
    return json.loads(lines[-1])


def packing_rows(args: argparse.Namespace) -> list[dict]:
    """One step (forward, recipe loss, backward) padded and packed, on rollouts of mixed lengths."""
    import numpy as np

    vocab, prompt = 49152, 32
    completions = np.random.default_rng(0).integers(32, 1025, 8).tolist()
    rollouts, scores = synthetic_rollouts(vocab, [(prompt, c) for c in completions], top_k=args.k)
    options = dict(pad_id=0, special_ids=[0], keep_ids=[], mask_special_tokens=False)
    layouts = {name: collate(rollouts, scores, **options, packed=name == "packed") for name in ("padded", "packed")}
    model = student(vocab, 256, prompt + max(completions) + 1, layers=4)
    config = TrainConfig(student="s", prompts="p")

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss, _ = per_position_loss(config, student_scores(model, batch), batch)
        (loss.sum() / batch.mask.sum()).backward()

    best = common.interleaved_best({name: lambda b=b: step(b) for name, b in layouts.items()}, repeats=args.repeats)
    tokens = sum(prompt + c for c in completions)
    return [
        {
            "layout": name,
            "model_tokens": layouts[name].input_ids.numel(),
            "real_tokens": tokens,
            "seconds": best[name]["seconds"],
            "tokens_per_s": tokens / best[name]["seconds"],
            "speedup": best["padded"]["seconds"] / best[name]["seconds"],
        }
        for name in layouts
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="P, scored positions")
    parser.add_argument("--vocab", type=int, default=152064, help="V (152064: Qwen2)")
    parser.add_argument("--hidden", type=int, default=64, help="H")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--loss", default="topk_rkl", choices=LOSSES)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="address-space limit of each child")
    parser.add_argument("--packing", action="store_true", help="padded against packed micro-batches instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        args.length = args.lengths[0]
        child(args)
        return
    if args.packing:
        common.header("(h) training step on 8 rollouts of 64-1056 tokens: padded against packed, float32")
        rows = packing_rows(args)
        for row in rows:
            common.emit({"bench": "trainer-packing", **row})
        columns = ("layout", "model_tokens", "real_tokens", "seconds", "tokens_per_s", "speedup")
        common.print_table(rows, {name: name.replace("_", " ") for name in columns})
        common.footer()
        return
    common.header(f"(h) training step, V={args.vocab}, H={args.hidden}, K={args.k}, loss {args.loss}, float32")
    rows = []
    for length in args.lengths:
        measured = {path: measure_in_child(path, length, args) for path in args.paths}
        for path, record in measured.items():
            row = {"path": path, "positions": length, **record}
            full = measured.get("full", {})
            if "step_peak_mib" in record and "step_peak_mib" in full:
                row["peak_vs_full"] = record["step_peak_mib"] / full["step_peak_mib"]
                row["time_vs_full"] = record["seconds"] / full["seconds"]
            common.emit({"bench": "trainer", "vocab": args.vocab, "hidden": args.hidden, "loss": args.loss, **row})
            rows.append(row)
    common.print_table(
        rows,
        {
            "path": "path",
            "positions": "P",
            "seconds": "step s",
            "tokens_per_s": "positions/s",
            "step_peak_mib": "step peak MiB",
            "peak_vs_full": "peak / full",
            "time_vs_full": "time / full",
            "error": "error",
        },
    )
    common.footer()


if __name__ == "__main__":
    main()
