"""Several teachers for one student: a prompt may name its teacher (`"teacher": "math"` in the
prompts file), and every rollout is scored by its prompt's teacher.

One client, and one session, per teacher named (the teacher service hosts them by name;
student_trainer/client.py), at the teacher's own endpoint where one is given (teachers served by
different deployments) and at the common target otherwise; a batch's rollouts are split by
teacher, sent at once, and their answers put back in the batch's order. Prompts that name none go
to the server's default teacher (""), so a run without names is one teacher, as before.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Sequence

from student_trainer.client import TeacherClient
from student_trainer.messages import TeacherScores


class TeacherRouter:
    def __init__(
        self,
        target: str,
        names: Sequence[str],
        pins: dict[str, str] | None = None,
        endpoints: dict[str, str] | None = None,
        **options,
    ) -> None:
        """`names`: the teachers the prompts name ("" the default); `pins`: a pin per name, from a
        checkpoint (the `pin_teacher` option pins the others as their first GetInfo reports);
        `endpoints`: the target of each teacher served elsewhere than `target`."""
        pins, endpoints = pins or {}, endpoints or {}
        self.clients: dict[str, TeacherClient] = {}
        try:
            for name in dict.fromkeys(names):
                pinned = {"pin_teacher": pins[name]} if name in pins and options.get("pin_teacher") else {}
                self.clients[name] = TeacherClient(endpoints.get(name, target), **(options | pinned), teacher=name)
        except BaseException:
            self.close()
            raise

    def open_sessions(self, tokenizer, **session_options) -> None:
        for client in self.clients.values():
            client.open_session(tokenizer, **session_options)

    @property
    def pins(self) -> dict[str, str]:
        return {name: client.pin for name, client in self.clients.items() if client.pin}

    def submit_score_many(self, requests: Sequence[tuple], teachers: Sequence[str], top_k: int) -> Future:
        """The scores of `requests[i]` by teacher `teachers[i]`, in order, as one Future."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(teachers):
            rows.setdefault(name, []).append(row)
        parts = {
            name: self.clients[name].submit_score_many([requests[row] for row in indices], top_k)
            for name, indices in rows.items()
        }
        merged: Future = Future()
        remaining, lock = [len(parts)], threading.Lock()

        def gather(_: Future) -> None:  # called on the clients' threads as each part finishes
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            scores: list[TeacherScores | None] = [None] * len(requests)
            try:
                for name, part in parts.items():
                    for row, score in zip(rows[name], part.result(), strict=True):
                        scores[row] = score
            except BaseException as error:
                merged.set_exception(error)
                return
            merged.set_result(scores)

        if not parts:
            merged.set_result([])
        for part in parts.values():
            part.add_done_callback(gather)
        return merged

    def score_many(self, requests: Sequence[tuple], teachers: Sequence[str], top_k: int) -> list[TeacherScores]:
        return self.submit_score_many(requests, teachers, top_k).result()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> "TeacherRouter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
