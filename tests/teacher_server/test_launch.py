"""The one teacher launcher (teacher_server/launch.py): serves, stops, and reports a teacher that dies."""

from __future__ import annotations

import pytest

from student_trainer.client import TeacherClient
from teacher_server.launch import TeacherProcess


def test_teacher_subprocess_serves_then_stops(tiny_model, tmp_path):
    log_path = tmp_path / "teacher.log"
    with TeacherProcess(tiny_model, log=log_path) as teacher:
        with TeacherClient(teacher.target) as client:
            info = client.get_info()
            client.open_session()
            scores = client.score([1, 5, 6, 7, 8], score_from=2, top_k=4)
    assert info.vocab_size == 96 and scores.ids.shape == (3, 4)
    assert teacher.returncode == 0  # SIGTERM: drained and exited cleanly
    assert "serving" in log_path.read_text()


def test_teacher_that_dies_is_reported_with_its_log(tmp_path):
    log_path = tmp_path / "teacher.log"
    with pytest.raises(RuntimeError, match="teacher exited with code .*teacher.log") as error:
        TeacherProcess(tmp_path / "no-such-model", log=log_path, timeout_s=60)
    assert log_path.read_text() and "its last lines" in str(error.value)  # the traceback is there for the user
