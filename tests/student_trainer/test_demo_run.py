"""The demo's plumbing: the teacher subprocess, its health wait, the plot (the full demo is `opd-demo`)."""

from __future__ import annotations

import pytest

from student_trainer.client import TeacherClient
from student_trainer.demo.run import free_port, teacher_service
from student_trainer.plots import plot_metrics


def test_teacher_service_subprocess_serves_then_stops(tiny_model, tmp_path):
    log_path = tmp_path / "teacher.log"
    with teacher_service(tiny_model, free_port(), log_path) as target:
        with TeacherClient(target) as client:
            info = client.get_info()
            client.open_session()
            scores = client.score([1, 5, 6, 7, 8], score_from=2, top_k=4)
    assert info.vocab_size == 96 and scores.ids.shape == (3, 4)
    assert "serving" in log_path.read_text()


def test_teacher_that_dies_is_reported_with_its_log(tmp_path):
    log_path = tmp_path / "teacher.log"
    with pytest.raises(RuntimeError, match="teacher exited with code .*teacher.log"):
        with teacher_service(tmp_path / "no-such-model", free_port(), log_path, timeout_s=60):
            pass
    assert log_path.read_text()  # the traceback is there for the user


def test_plot_metrics_writes_a_png(tmp_path):
    records = [{"step": 0, "accuracy": 0.2, "eval_topk_rkl": 1.0}] + [
        {"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "teacher_support_mass": 0.9} for s in range(1, 6)
    ]
    path = plot_metrics(records, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
