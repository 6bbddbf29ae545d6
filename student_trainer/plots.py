"""PNG plots of a run's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

# Panels in reading order: what improved, what the loss did, what the teacher saw.
PANELS = [
    ("accuracy", "held-out task accuracy"),
    ("eval_topk_rkl", "held-out truncated reverse KL"),
    ("loss", "training loss"),
    ("teacher_support_mass", "teacher mass on its top-K"),
    ("student_support_mass", "student mass on the training support"),
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
    ("student_support_mass", "student mass on the training support (5-step mean)", False),
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


def plot_study(
    records: dict[str, list[list[dict]]], runs: dict[str, list[dict]], labels: dict[str, str], output: Path
) -> list[Path]:
    """curves.png (metrics over steps) and bars.png (per-run numbers) of opd-study.

    `records[variant]` holds one list of metric records per seed; `runs[variant]` one dict of
    per-run numbers per seed (study_report.summarize_run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(records)}
    return [_curves(plt, records, labels, colors, output), _bars(plt, runs, labels, colors, output)]


def _curves(plt, records: dict[str, list[list[dict]]], labels: dict[str, str], colors: dict, output: Path) -> Path:
    """curves.png: each STUDY_PANELS metric over steps, mean over seeds with a min..max band."""
    # Dashed: the baseline; dotted: a student with another tokenizer than the teacher's.
    style = {name: "--" if name.startswith("sampled") else ":" if "xtok" in name else "-" for name in records}
    figure, axes = plt.subplots(3, 2, figsize=(11, 10), squeeze=False)
    for axis, (key, title, log_scale) in zip(axes.flat, STUDY_PANELS):
        smooth = 1 if key in ("accuracy", "heldout_rkl", "negative_advantage_share", "masked") else 5
        for name, seeds in records.items():
            steps, mean, low, high = _series(seeds, key, smooth)
            if not steps:
                continue
            width = 2.4 if name == "recipe" else 1.3
            axis.plot(steps, mean, style[name], color=colors[name], label=labels.get(name, name), linewidth=width)
            axis.fill_between(steps, low, high, color=colors[name], alpha=0.15, linewidth=0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if log_scale:
            axis.set_yscale("log")
    axes[1, 0].set_ylim(bottom=0.1)  # a collapsed run has no loss left: its gradient norm is 0
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=4, fontsize=9, frameon=False)
    figure.suptitle("opd-study: mean over seeds, band = min..max over seeds")
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    curves = output / "curves.png"
    figure.savefig(curves, dpi=80)
    plt.close(figure)

    return curves


def _bars(plt, runs: dict[str, list[dict]], labels: dict[str, str], colors: dict, output: Path) -> Path:
    """bars.png: per-run numbers, bar = mean over seeds, dots = seeds."""
    bar_panels = [
        ("accuracy_final", "final held-out accuracy", False),
        ("grad_norm_var", "grad-norm variance, all steps", True),
        ("grad_norm_var_live", "grad-norm variance, live steps (masked < 0.5)", True),
    ]
    names = list(runs)
    figure, axes = plt.subplots(1, len(bar_panels), figsize=(14, 4.2), squeeze=False)
    for axis, (key, title, log_scale) in zip(axes.flat, bar_panels):
        for x, name in enumerate(names):
            values = [run[key] for run in runs[name] if run.get(key) == run.get(key)]  # NaN-free
            if values:
                axis.bar(x, sum(values) / len(values), color=colors.get(name), alpha=0.6)
                axis.plot([x] * len(values), values, "o", color="black", markersize=3)
        axis.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
        if log_scale:
            axis.set_yscale("log")
    # Each variant's own start (the cross-tokenizer variants start from another student).
    for x, name in enumerate(names):
        starts = [run["accuracy_start"] for run in runs[name]]
        if starts:
            label = "before training" if x == 0 else None
            axes[0, 0].plot([x - 0.4, x + 0.4], [sum(starts) / len(starts)] * 2, ":", color="gray", label=label)
    if names:
        axes[0, 0].legend(fontsize=8)
    figure.suptitle("opd-study: bar = mean over seeds, dots = seeds", fontsize=11)
    figure.tight_layout()
    bars = output / "bars.png"
    figure.savefig(bars, dpi=80)
    plt.close(figure)
    return bars
