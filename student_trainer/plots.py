"""PNG plots of a run's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

# Panels in reading order: what improved, what the loss did, what the teacher saw.
PANELS = [
    ("accuracy", "held-out task accuracy"),
    ("eval_topk_rkl", "held-out truncated reverse KL"),
    ("loss", "training loss"),
    ("teacher_support_mass", "teacher mass on its top-K"),
    ("student_support_mass", "student mass on teacher top-K"),
    ("negative_advantage_share", "share of negative sampled-token advantages"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("response_length", "response length (tokens)"),
]


def plot_metrics(records: list[dict], path: Path, title: str = "on-policy distillation") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in PANELS if any(key in record for record in records)]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(10, 2.6 * rows), squeeze=False)
    for axis, (key, label) in zip(axes.flat, panels):
        points = [(record["step"], record[key]) for record in records if key in record]
        axis.plot(*zip(*points), marker="o" if len(points) < 20 else None)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.ticklabel_format(axis="y", useOffset=False)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# plot_study: per variant, mean over seeds (line) and min..max over seeds (band).
STUDY_PANELS = [
    ("accuracy", "held-out task accuracy (greedy)", False),
    ("heldout_rkl", "held-out reverse KL to the teacher", True),
    ("grad_norm", "gradient norm before clipping (5-step mean)", True),
    ("student_support_mass", "student mass on teacher top-K (5-step mean)", False),
    ("negative_advantage_share", "share of negative sampled-token advantages", False),
    ("masked", "masked fraction of positions", False),
]


def _series(runs: list[list[dict]], key: str, smooth: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, and per step the mean, min and max over runs of `key` (a trailing `smooth`-step mean first)."""
    by_step: dict[int, list[float]] = {}
    for records in runs:
        points = [(r["step"], r[key]) for r in records if key in r]
        for i, (step, _) in enumerate(points):
            window = [value for _, value in points[max(0, i - smooth + 1) : i + 1]]
            by_step.setdefault(step, []).append(sum(window) / len(window))
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_study(records: dict[str, list[list[dict]]], labels: dict[str, str], output: Path) -> list[Path]:
    """curves.png (metrics over steps) and bars.png (final accuracy, gradient-norm variance) of opd-study.

    `records[variant]` holds one list of metric records per seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(records)}
    style = {name: "--" if name.startswith("sampled") else "-" for name in records}
    figure, axes = plt.subplots(3, 2, figsize=(11, 10), squeeze=False)
    for axis, (key, title, log_scale) in zip(axes.flat, STUDY_PANELS):
        smooth = 1 if key in ("accuracy", "heldout_rkl", "negative_advantage_share", "masked") else 5
        for name, runs in records.items():
            steps, mean, low, high = _series(runs, key, smooth)
            if not steps:
                continue
            axis.plot(steps, mean, style[name], color=colors[name], label=labels.get(name, name), linewidth=1.4)
            axis.fill_between(steps, low, high, color=colors[name], alpha=0.15, linewidth=0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if log_scale:
            axis.set_yscale("log")
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=4, fontsize=9, frameon=False)
    figure.suptitle("opd-study: mean over seeds, band = min..max over seeds")
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    curves = output / "curves.png"
    figure.savefig(curves, dpi=80)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    names = list(records)
    finals = {name: [[r["accuracy"] for r in run if "accuracy" in r] for run in records[name]] for name in names}
    grads = {name: [[r["grad_norm"] for r in run if "grad_norm" in r] for run in records[name]] for name in names}
    per_seed = {
        "final held-out accuracy": {name: [curve[-1] for curve in finals[name] if curve] for name in names},
        "variance of the gradient norm over steps": {
            name: [sum((g - sum(run) / len(run)) ** 2 for g in run) / len(run) for run in grads[name] if run]
            for name in names
        },
    }
    for axis, (title, values) in zip(axes.flat, per_seed.items()):
        for x, name in enumerate(names):
            seeds = values[name]
            if not seeds:
                continue
            axis.bar(x, sum(seeds) / len(seeds), color=colors[name], alpha=0.6)
            axis.plot([x] * len(seeds), seeds, "o", color="black", markersize=3)
        axis.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
        axis.set_title(title + " (bar = mean, dots = seeds)", fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    starts = [curve[0] for name in names for curve in finals[name] if curve]
    if starts:
        axes[0, 0].axhline(sum(starts) / len(starts), color="gray", linestyle=":", label="before training")
        axes[0, 0].legend(fontsize=8)
    axes[0, 1].set_yscale("log")
    figure.tight_layout()
    bars = output / "bars.png"
    figure.savefig(bars, dpi=80)
    plt.close(figure)
    return [curves, bars]
