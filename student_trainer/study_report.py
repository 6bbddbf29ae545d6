"""The numbers of `opd-study` (study.py): per run, over seeds, the claims, the markdown table.

Pure functions of metric records (train.py's metrics.jsonl lines); no I/O, no torch.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

# Per-run numbers, in table order: key, column title, format.
COLUMNS = [
    ("accuracy_final", "final acc.", ".3f"),
    ("accuracy_best", "best acc.", ".3f"),
    ("accuracy_drawdown", "max acc. drop", ".3f"),
    ("accuracy_doubled_digit_final", "final acc., doubled digit", ".3f"),
    ("accuracy_no_doubled_digit_final", "final acc., no doubled digit", ".3f"),
    ("heldout_rkl_final", "held-out rKL", ".3f"),
    ("heldout_masked_final", "held-out masked", ".3f"),
    ("grad_norm_mean", "grad-norm mean", ".3g"),
    ("grad_norm_var", "grad-norm var", ".3g"),
    ("grad_norm_cv", "grad-norm CV", ".2f"),
    ("grad_norm_var_live", "grad-norm var, live steps", ".3g"),
    ("live_steps", "live steps", ".0f"),
    ("student_support_mass", "student mass on support", ".3f"),
    ("negative_advantage_share", "neg. adv. share", ".3f"),
    ("masked", "masked", ".3f"),
]

Variants = dict[str, dict[str, Any]]  # variant name -> its runs and summary (study.py)


LIVE_MASKED = 0.5


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def summarize_run(records: list[dict]) -> dict[str, float]:
    """Scalars of one run from its metric records (step 0 = evaluation before training).

    accuracy_drawdown: the largest drop of held-out accuracy below its best value so far
    (0 for a curve that never goes down). grad_norm_var is the variance of the pre-clipping
    gradient norm over the steps; grad_norm_cv its standard deviation over its mean.
    Live steps are those where at least half of the completion positions carry a loss
    (masked < LIVE_MASKED): a student that collapsed into masked special tokens has no loss
    and a zero gradient, which would otherwise count as gradient variance.
    Support mass and response length are means over the last quarter of the steps; the
    advantage share and the masked fraction are means over all steps.
    """
    evals = [r for r in records if "accuracy" in r]
    steps = [r for r in records if "grad_norm" in r]
    if not evals or not steps:
        raise ValueError("a run needs at least one evaluation and one training step")
    tail = steps[-max(1, len(steps) // 4) :]
    accuracy = [r["accuracy"] for r in evals]
    best, drawdown = -math.inf, 0.0
    for value in accuracy:
        best = max(best, value)
        drawdown = max(drawdown, best - value)
    grad = [r["grad_norm"] for r in steps]
    grad_mean = _mean(grad)
    grad_var = statistics.pvariance(grad)
    live = [r["grad_norm"] for r in steps if r["masked"] < LIVE_MASKED]
    return {
        "accuracy_start": accuracy[0],
        "accuracy_final": accuracy[-1],
        "accuracy_best": max(accuracy),
        "accuracy_drawdown": drawdown,
        "accuracy_doubled_digit_final": evals[-1].get("accuracy_doubled_digit", math.nan),
        "accuracy_no_doubled_digit_final": evals[-1].get("accuracy_no_doubled_digit", math.nan),
        "heldout_rkl_start": evals[0].get("heldout_rkl", math.nan),
        "heldout_rkl_final": evals[-1].get("heldout_rkl", math.nan),
        "heldout_masked_final": evals[-1].get("heldout_masked", math.nan),
        "heldout_support_mass_final": evals[-1].get("heldout_support_mass", math.nan),
        "grad_norm_mean": grad_mean,
        "grad_norm_var": grad_var,
        "grad_norm_cv": math.sqrt(grad_var) / grad_mean if grad_mean > 0 else math.nan,
        "live_steps": float(len(live)),
        "grad_norm_mean_live": _mean(live),
        "grad_norm_var_live": statistics.pvariance(live) if live else math.nan,
        "student_support_mass": _mean([r["student_support_mass"] for r in tail]),
        "negative_advantage_share": _mean([r["negative_advantage_share"] for r in steps]),
        "masked": _mean([r["masked"] for r in steps]),
        "response_length": _mean([r["response_length"] for r in tail]),
        "step_s": _mean([r["step_s"] for r in steps]),
    }


def aggregate(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: mean, std (sample, ddof 1; 0 for one run), min, max and n over the runs (seeds)."""
    keys = [key for key in runs[0] if key != "seed"] if runs else []
    out = {}
    for key in keys:
        values = [float(run[key]) for run in runs]
        out[key] = {
            "mean": _mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    return out


def compare(better: list[float], worse: list[float], higher_is_better: bool = True) -> str:
    """Verdict for "`better` beats `worse`" over seeds.

    "held": every seed of one beats every seed of the other; "weakly held": the means are in
    the claimed order but the seed ranges overlap; "not held": they are not; "no data": a NaN.
    (claims() also says "not evaluated" for a variant not run, "not tested" for runs identical
    with and without the switch under test.)
    """
    if any(math.isnan(value) for value in [*better, *worse]):
        return "no data"
    sign = 1.0 if higher_is_better else -1.0
    if sign * (_mean(better) - _mean(worse)) <= 0:
        return "not held"
    if sign * (min(better) if higher_is_better else max(better)) > sign * (
        max(worse) if higher_is_better else min(worse)
    ):
        return "held"
    return "weakly held"


def _values(variant: dict[str, Any], key: str) -> list[float]:
    return [float(run[key]) for run in variant["runs"]]


def _spread(variant: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    values = _values(variant, key)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{_mean(values):{fmt}} ± {std:{fmt}}"


def _below_start(variant: dict[str, Any]) -> str:
    runs = variant["runs"]
    return f"{sum(run['accuracy_final'] < run['accuracy_start'] for run in runs)}/{len(runs)}"


def _weakest(verdicts: list[str]) -> str:
    order = ["no data", "not held", "weakly held", "held"]
    return min(verdicts, key=order.index)


def _accuracy_vs(v: Variants, a: str, b: str, text: str) -> tuple[str, str]:
    verdict = compare(_values(v[a], "accuracy_final"), _values(v[b], "accuracy_final"))
    return verdict, (
        f"final held-out accuracy {text}: {a} {_spread(v[a], 'accuracy_final')} vs "
        f"{b} {_spread(v[b], 'accuracy_final')}; held-out rKL {_spread(v[a], 'heldout_rkl_final')} "
        f"vs {_spread(v[b], 'heldout_rkl_final')}; held-out masked "
        f"{_spread(v[a], 'heldout_masked_final')} vs {_spread(v[b], 'heldout_masked_final')}"
    )


def _recipe_beats_baseline(v: Variants) -> tuple[str, str]:
    return _accuracy_vs(v, "recipe", "sampled_g0", "(higher is better)")


def _stability(v: Variants) -> tuple[str, str]:
    verdict = compare(
        _values(v["recipe"], "accuracy_drawdown"),
        _values(v["sampled_g0"], "accuracy_drawdown"),
        higher_is_better=False,
    )
    return verdict, (
        f"largest held-out accuracy drop below its best so far (lower is better): recipe "
        f"{_spread(v['recipe'], 'accuracy_drawdown')} vs sampled_g0 "
        f"{_spread(v['sampled_g0'], 'accuracy_drawdown')}; gradient-norm CV recipe "
        f"{_spread(v['recipe'], 'grad_norm_cv', '.2f')} vs "
        f"{_spread(v['sampled_g0'], 'grad_norm_cv', '.2f')}; seeds ending below their start "
        f"accuracy: recipe {_below_start(v['recipe'])} vs sampled_g0 {_below_start(v['sampled_g0'])}"
    )


def _collapse(v: Variants) -> tuple[str, str]:
    runs = v["recipe_no_renorm"]["runs"]
    below = [run["accuracy_final"] < run["accuracy_start"] for run in runs]
    verdict = "held" if all(below) else "weakly held" if any(below) else "not held"
    return verdict, (
        f"collapse = final accuracy below the start: {_below_start(v['recipe_no_renorm'])} seeds; "
        f"start {_spread(v['recipe_no_renorm'], 'accuracy_start')}, final "
        f"{_spread(v['recipe_no_renorm'], 'accuracy_final')} (recipe: "
        f"{_spread(v['recipe'], 'accuracy_final')}); student mass on the support "
        f"{_spread(v['recipe_no_renorm'], 'student_support_mass')} (recipe: "
        f"{_spread(v['recipe'], 'student_support_mass')})"
    )


def _top_p1_worse(v: Variants) -> tuple[str, str]:
    return _accuracy_vs(v, "sampled_g0", "recipe_top_p1", "(the baseline should be higher)")


def _gamma_variance(v: Variants) -> tuple[str, str]:
    names = ("sampled_g0", "sampled_g0.5", "sampled_g1")
    base = _values(v["sampled_g0"], "grad_norm_var_live")
    verdicts = [compare(_values(v[name], "grad_norm_var_live"), base) for name in names[1:]]
    live = " / ".join(_spread(v[name], "grad_norm_var_live", ".3g") for name in names)
    whole = " / ".join(_spread(v[name], "grad_norm_var", ".3g") for name in names)
    means = " / ".join(_spread(v[name], "grad_norm_mean_live", ".3g") for name in names)
    steps = " / ".join(_spread(v[name], "live_steps", ".0f") for name in names)
    return _weakest(verdicts), (
        f"variance of the pre-clipping gradient norm over the live steps (masked < {LIVE_MASKED}), "
        f"gamma 0 / 0.5 / 1: {live} (live steps {steps}; mean norm {means}); over all steps: {whole}"
    )


def _masking(v: Variants) -> tuple[str, str]:
    on, off = v["recipe_xtok"], v["recipe_xtok_nomask"]
    share_on, share_off = _mean(_values(on, "masked")), _mean(_values(off, "masked"))
    gaps = ", ".join(f"{abs(a - b):.3f}" for a, b in zip(_values(on, "accuracy_final"), _values(off, "accuracy_final")))
    numbers = (
        f"final held-out accuracy with masking {_spread(on, 'accuracy_final')} (start "
        f"{_spread(on, 'accuracy_start')}) vs without {_spread(off, 'accuracy_final')}; held-out rKL "
        f"{_spread(on, 'heldout_rkl_final')} vs {_spread(off, 'heldout_rkl_final')}; masked share in training "
        f"{_spread(on, 'masked')} vs {_spread(off, 'masked')}, held-out {_spread(on, 'heldout_masked_final')} "
        f"vs {_spread(off, 'heldout_masked_final')}"
    )
    # Without the trainer's masking the special positions should carry a loss. If (about) as many
    # are still masked, the service masked them itself: the switch changed nothing the loss sees.
    if share_on == 0 or share_off >= 0.5 * share_on:
        return "not tested", (
            f"without the trainer's masking {share_off:.4f} of the positions were still masked "
            f"(with it {share_on:.4f}): the switch did not unmask them, so the two variants are "
            f"replicates and their per-seed final-accuracy gaps ({gaps}) are run-to-run noise; " + numbers
        )
    return compare(_values(on, "accuracy_final"), _values(off, "accuracy_final")), numbers


def _baseline_masking(v: Variants) -> tuple[str, str]:
    # The README's account of the baseline's collapse: special targets carry no loss, so nothing
    # pushes the special tokens down. Without masking the estimator sees them.
    verdict = compare(_values(v["sampled_g0_nomask"], "accuracy_final"), _values(v["sampled_g0"], "accuracy_final"))
    return verdict, (
        f"final held-out accuracy without masking {_spread(v['sampled_g0_nomask'], 'accuracy_final')} "
        f"vs with {_spread(v['sampled_g0'], 'accuracy_final')}; held-out masked share (special tokens "
        f"written) {_spread(v['sampled_g0_nomask'], 'heldout_masked_final')} vs "
        f"{_spread(v['sampled_g0'], 'heldout_masked_final')}; live steps "
        f"{_spread(v['sampled_g0_nomask'], 'live_steps', '.0f')} vs {_spread(v['sampled_g0'], 'live_steps', '.0f')}"
    )


MIN_GAIN_RATIO = 0.9  # issue 19: the cross-tokenizer student's gain against the same-tokenizer student's


def _gain_ratio(v: Variants) -> tuple[str, str]:
    """Gain = final - starting held-out accuracy, mean over seeds; the ratio of the two means."""
    gains = {
        name: _mean([run["accuracy_final"] - run["accuracy_start"] for run in v[name]["runs"]])
        for name in ("recipe_xtok_union", "recipe")
    }
    if any(math.isnan(gain) for gain in gains.values()) or gains["recipe"] <= 0:
        return "no data", f"gains {gains}: the same-tokenizer student gained nothing to compare with"
    ratio = gains["recipe_xtok_union"] / gains["recipe"]
    return "held" if ratio >= MIN_GAIN_RATIO else "not held", (
        f"gain (final - start held-out accuracy) recipe_xtok_union {gains['recipe_xtok_union']:.3f} "
        f"({_spread(v['recipe_xtok_union'], 'accuracy_start')} -> {_spread(v['recipe_xtok_union'], 'accuracy_final')}) "
        f"vs recipe {gains['recipe']:.3f} ({_spread(v['recipe'], 'accuracy_start')} -> "
        f"{_spread(v['recipe'], 'accuracy_final')}): {ratio:.2f} of it (claim: >= {MIN_GAIN_RATIO})"
    )


# Each claim of the issue: its text, the variants it needs, and its verdict with the numbers behind it.
CLAIMS: list[tuple[str, list[str], Callable[[Variants], tuple[str, str]]]] = [
    ("the recipe ends better than sampled-token OPD (gamma 0)", ["recipe", "sampled_g0"], _recipe_beats_baseline),
    ("the recipe trains more stably than sampled-token OPD (gamma 0)", ["recipe", "sampled_g0"], _stability),
    ("without renormalisation the recipe collapses", ["recipe_no_renorm", "recipe"], _collapse),
    (
        "without top-p (top-p 1.0) the recipe is worse than sampled-token OPD (gamma 0)",
        ["recipe_top_p1", "sampled_g0"],
        _top_p1_worse,
    ),
    (
        "discounted sequence-level credit (gamma > 0) raises gradient variance",
        ["sampled_g0", "sampled_g0.5", "sampled_g1"],
        _gamma_variance,
    ),
    (
        "under a tokenizer mismatch, special-token masking helps the recipe",
        ["recipe_xtok", "recipe_xtok_nomask"],
        _masking,
    ),
    (
        "sampled-token OPD (gamma 0) collapses into special tokens because they are masked: without masking it ends better",
        ["sampled_g0_nomask", "sampled_g0"],
        _baseline_masking,
    ),
    (
        "joining the student's own top-4 to the teacher's top-4 support improves on the top-4 alone",
        ["topk_k4_union", "topk_k4"],
        lambda v: _accuracy_vs(v, "topk_k4_union", "topk_k4", "(higher is better)"),
    ),
    (
        "joining the student's own top-8 to the projected support improves the cross-tokenizer recipe",
        ["recipe_xtok_union", "recipe_xtok"],
        lambda v: _accuracy_vs(v, "recipe_xtok_union", "recipe_xtok", "(higher is better)"),
    ),
    (
        f"with the union, the cross-tokenizer student gains >= {MIN_GAIN_RATIO} of the same-tokenizer student's gain",
        ["recipe_xtok_union", "recipe"],
        _gain_ratio,
    ),
]


def claims(variants: Variants) -> list[dict[str, str]]:
    """Each claim of CLAIMS with its verdict and the numbers behind it ("not evaluated" if a variant is missing)."""
    out: list[dict[str, str]] = []
    for claim, needed, judge in CLAIMS:
        if all(name in variants for name in needed):
            verdict, detail = judge(variants)
            out.append({"claim": claim, "verdict": verdict, "detail": detail})
        else:
            out.append({"claim": claim, "verdict": "not evaluated", "detail": f"needs variants {needed}"})
    return out


def markdown_table(variants: dict[str, dict[str, Any]]) -> str:
    """One row per variant: mean ± std over seeds of every COLUMNS metric."""
    header = ["variant", "K sent", "seeds"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, variant in variants.items():
        cells = [f"`{name}`", str(variant["top_k_sent"]), str(len(variant["runs"]))]
        for key, _, fmt in COLUMNS:
            stats = variant["aggregate"][key]
            cells.append(f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    variants = summary["variants"]
    # The starting numbers of each student (the *_xtok variants start from another one).
    starts: dict[str, list[dict]] = {}
    for variant in variants.values():
        starts.setdefault(variant.get("student", "demo"), []).extend(variant["runs"])
    start = "; ".join(
        f"{kind} student: accuracy {_mean([r['accuracy_start'] for r in runs]):.3f}, held-out rKL "
        f"{_mean([r['heldout_rkl_start'] for r in runs]):.3f}"
        for kind, runs in starts.items()
    )
    parts = [
        f"Seeds {list(settings['seeds'])}, {settings['steps']} steps of batch {settings['batch_size']}, "
        f"lr {settings['lr']:g}; evaluated every {settings['eval_every']} steps on "
        f"{settings['accuracy_problems']} held-out problems (greedy exact match) and on "
        f"{settings['kl_rollouts']} held-out rollouts (reverse KL, top-p 1.0, K = {summary['teacher_max_k']}). "
        f"Start: {start}. Cells are mean ± standard deviation over seeds.\n",
        markdown_table(variants),
        "| claim | verdict | numbers |\n| --- | --- | --- |",
    ]
    parts += [f"| {c['claim']} | **{c['verdict']}** | {c['detail']} |" for c in summary["claims"]]
    parts.append(f"\nCross-tokenizer variants: {summary['cross_tokenizer']}.\n")
    return "\n".join(parts)
