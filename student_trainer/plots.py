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
