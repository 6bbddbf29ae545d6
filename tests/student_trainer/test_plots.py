"""The plots of the demo and the study (student_trainer/plots.py)."""

from __future__ import annotations

from student_trainer.plots import plot_metrics


def test_plot_metrics_writes_a_png(tmp_path):
    records = [{"step": 0, "accuracy": 0.2, "eval_topk_rkl": 1.0}] + [
        {"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "teacher_support_mass": 0.9} for s in range(1, 6)
    ]
    path = plot_metrics(records, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
