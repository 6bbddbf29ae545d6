"""(d) The loss step at a large vocabulary: time and peak memory of three ways to the same gradient.

    python bench/loss.py                                   # V=152064, T=4096, H=896, K=32
    python bench/loss.py --length 1024 --hidden 576        # smaller

One forward + backward of the loss from final hidden states h [T, H] and the lm head W [V, H]
(both require grad: the lm head trains), each variant in a fresh subprocess:

  full-kl   the full-vocabulary reverse KL: logits = h @ W^T, log q = log_softmax, against the
            teacher's full log-probabilities [T, V] (an input of this variant only)
  topk      student_trainer.losses.topk_reverse_kl on logits = h @ W^T gathered at the support
            (the recipe loss: the teacher's top-K support, renormalised) -- the [T, V] logits exist
  support   the same loss from h and W directly, as the trainer computes it: the student's
            logits for the K support ids only (head.OutputHead.logits_at), never [T, V]

Memory, from the subprocess's VmHWM: "step peak" is the most the step itself allocated on top
of its inputs (W's gradient, [V, H], included: about 0.5 GiB at the defaults, the floor of any
variant whose lm head trains); "peak" adds the inputs (h, W and the teacher's data: top-K rows,
or for full-kl the full [T, V] log-probabilities).
The script checks that topk and support give the same loss and gradients (float64, small T).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import torch  # noqa: E402

from student_trainer.head import OutputHead  # noqa: E402
from student_trainer.losses import topk_reverse_kl  # noqa: E402

VARIANTS = ("full-kl", "topk", "support")


def full_reverse_kl(logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the whole vocabulary, per position; 0 where masked."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - teacher_logprobs)).sum(-1)
    return torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype))


def inputs(variant: str, length: int, vocab: int, hidden: int, k: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(length, hidden, generator=generator, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator, dtype=dtype) * hidden**-0.5).requires_grad_()
    mask = torch.ones(length, dtype=torch.bool)
    if variant == "full-kl":
        teacher = torch.log_softmax(torch.randn(length, vocab, generator=generator, dtype=dtype) * 3, dim=-1)
        return h, w, (teacher, mask)
    values, ids = (torch.randn(length, vocab // 64, generator=generator, dtype=dtype) * 3).topk(k, dim=-1)
    teacher_ids = ids * 64  # spread over the vocabulary
    teacher_logprobs = values - torch.logsumexp(values, -1, keepdim=True) - 0.1  # top-K of a fuller distribution
    return h, w, (teacher_ids, teacher_logprobs, mask)


def step(variant: str, h: torch.Tensor, w: torch.Tensor, data) -> torch.Tensor:
    if variant == "full-kl":
        loss = full_reverse_kl(h @ w.T, *data).sum()
    elif variant == "topk":
        teacher_ids = data[0]
        loss = topk_reverse_kl((h @ w.T).gather(-1, teacher_ids.clamp(min=0)), *data).sum()
    else:
        loss = topk_reverse_kl(OutputHead(w).logits_at(h, data[0]), *data).sum()
    loss.backward()
    return loss.detach()


def child(variant: str, length: int, vocab: int, hidden: int, k: int) -> None:
    before = common.rss_mib()
    h, w, data = inputs(variant, length, vocab, hidden, k)
    with_inputs = common.rss_mib()
    common.reset_peak_rss()
    started = time.perf_counter()
    step(variant, h, w, data)
    seconds = time.perf_counter() - started
    peak = common.peak_rss_mib()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "inputs_mib": with_inputs - before,
                "step_peak_mib": peak - with_inputs,
                "peak_mib": peak - before,
            }
        )
    )


def check_agreement() -> float:
    """topk and support: same loss and gradients (float64, T=64, V=2048)."""
    h, w, data = inputs("topk", 64, 2048, 32, 16, dtype=torch.float64)
    grads = []
    for variant in ("topk", "support"):
        h.grad = w.grad = None
        loss = step(variant, h, w, data)
        grads.append((loss, h.grad.clone(), w.grad.clone()))
    worst = max(float((a - b).abs().max()) for a, b in zip(*grads))
    assert worst < 1e-10, worst
    return worst


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="T: positions in the step")
    parser.add_argument("--vocab", type=int, default=152064, help="V (152064: Qwen2)")
    parser.add_argument("--hidden", type=int, default=896, help="H (896: Qwen2.5-0.5B)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args.length, args.vocab, args.hidden, args.k)
        return
    common.header(f"(d) loss step, T={args.length}, V={args.vocab}, H={args.hidden}, K={args.k}, float32")
    common.emit({"bench": "loss", "check": "topk vs support, loss and gradients", "max_abs_diff": check_agreement()})
    rows = [{"variant": variant, **measure_in_child(variant, args)} for variant in args.variants]
    full = next((row for row in rows if row["variant"] == "full-kl"), None)
    for row in rows:
        if full is not None:
            row["step_vs_full"] = row["step_peak_mib"] / full["step_peak_mib"]
            row["peak_vs_full"] = row["peak_mib"] / full["peak_mib"]
            row["time_vs_full"] = row["seconds"] / full["seconds"]
        common.emit(
            {
                "bench": "loss",
                "length": args.length,
                "vocab": args.vocab,
                "hidden": args.hidden,
                "k": args.k,
                **row,
                "load_average": common.load_average(),
            }
        )
    common.print_table(
        rows,
        {
            "variant": "variant",
            "seconds": "step s",
            "time_vs_full": "time / full-kl",
            "step_peak_mib": "step peak MiB",
            "step_vs_full": "step peak / full-kl",
            "inputs_mib": "inputs MiB",
            "peak_mib": "peak with inputs MiB",
            "peak_vs_full": "peak with inputs / full-kl",
        },
    )
    common.footer()


def measure_in_child(variant: str, args: argparse.Namespace) -> dict:
    """The JSON line of `child` for one variant, run in a fresh subprocess (its own peak RSS)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--length",
        str(args.length),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--k",
        str(args.k),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
