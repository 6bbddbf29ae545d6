"""Special tokens across two tokenizers: which ones pair up, which stay in the loss.

A special (control) token has no bytes, so byte alignment cannot see it. A session
keeps an equivalence map student special -> teacher token:

* paired tokens stay in the loss: the student's token is a target like any other
  and the teacher's twin is offered as support (projected onto the student's id).
  By default the end-of-sequence / end-of-turn tokens pair up, or the student
  never learns when to stop. Further pairs (e.g. `<think>`) are a session setting.
* context-only twins (the same string is special in both vocabularies) are put in
  the teacher's copy of the text so it reads the same structure, but positions
  that target them stay masked.
* every other student special is dropped from the teacher's text and its
  positions are masked (reason SPECIAL); teacher specials not paired never appear
  in the support.

Without special-token masking (a session setting, for ablations) context-only twins
pair up too, and a dropped special's position stays in the loss: it takes the
teacher's distribution at that point of the text (session.py), and its own token,
which the teacher never writes, gets the floor log-probability.

A pair may also name text that is plain for the teacher (its `<think>` is not a
special token): the student's special then stands for those bytes, and the
teacher reads and predicts them as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable

SPECIAL_UNIT = 256  # units 256 + i stand for the i-th mapped teacher special token


@dataclass(frozen=True, eq=False)
class SpecialMap:
    # student special id -> teacher id, for the teacher's copy of the text
    to_teacher: dict[int, int]
    # student special ids that stay in the loss (their teacher twin is support)
    kept: frozenset[int]
    # teacher special id -> the unit that stands for it in the byte stream
    teacher_units: dict[int, int]
    # teacher special id -> student id it projects onto (paired specials only)
    teacher_to_student: dict[int, int]
    # student special id -> bytes it stands for (paired with a teacher text token)
    student_bytes: dict[int, bytes]
    # the pairs kept in the loss, (student token, teacher token or text)
    pairs: tuple[tuple[str, str], ...] = ()
    # False: positions of dropped student specials stay in the loss (no SPECIAL mask)
    mask: bool = True

    def unit_of_student(self, student_id: int) -> int | None:
        teacher = self.to_teacher.get(student_id)
        return None if teacher is None else self.teacher_units.get(teacher)


class PairError(ValueError):
    """A requested special-token pair that cannot be honoured."""


def special_map(
    student: ByteTable,
    teacher: ByteTable,
    student_eos: Sequence[str],
    teacher_eos_ids: Sequence[int],
    pairs: Sequence[tuple[str, str]] = (),
    pair_eos: bool = True,
    mask: bool = True,
) -> SpecialMap:
    to_teacher: dict[int, int] = {}
    kept: set[int] = set()
    student_bytes: dict[int, bytes] = {}

    # Context-only twins: the same string special on both sides.
    for string, index in student.ids.items():
        other = teacher.ids.get(string)
        if student.special[index] and other is not None and teacher.special[other]:
            to_teacher[index] = other

    wanted: list[tuple[int, int]] = []
    if pair_eos and teacher_eos_ids:
        for token in student_eos:
            if token in student.ids:
                wanted.append((student.ids[token], int(teacher_eos_ids[0])))
    text_twins: dict[int, bytes] = {}
    for student_token, teacher_token in pairs:
        if student_token not in student.ids:
            raise PairError(f"special-token pair: {student_token!r} is not in the student's vocabulary")
        if not student.special[student.ids[student_token]]:
            raise PairError(
                f"special-token pair: {student_token!r} is not a special token of the student (plain tokens align by their bytes)"
            )
        if not teacher_token:
            raise PairError(f"special-token pair: empty teacher token for {student_token!r}")
        teacher_id = teacher.ids.get(teacher_token)
        if teacher_id is not None and teacher.special[teacher_id]:
            wanted.append((student.ids[student_token], teacher_id))
        else:  # plain text for the teacher (one token of its vocabulary, or several)
            wanted.append((student.ids[student_token], -1))
            text_twins[student.ids[student_token]] = teacher_token.encode("utf-8")
    chosen: dict[int, int] = {}
    if not mask:  # no masking: context-only twins stay in the loss as pairs
        chosen.update(to_teacher)
    for student_id, teacher_id in wanted:  # a later (explicit) pair overrides the EOS default
        chosen[student_id] = teacher_id
    for student_id, teacher_id in chosen.items():
        kept.add(student_id)
        if teacher_id >= 0:
            to_teacher[student_id] = teacher_id
        else:  # the teacher writes it as text: the student's control token stands for those bytes
            to_teacher.pop(student_id, None)
            student_bytes[student_id] = text_twins[student_id]

    teacher_units = {
        teacher_id: SPECIAL_UNIT + rank for rank, teacher_id in enumerate(sorted(set(to_teacher.values())))
    }
    teacher_to_student: dict[int, int] = {}
    for student_id in sorted(kept):
        teacher_id = to_teacher.get(student_id)
        if teacher_id is not None:
            teacher_to_student.setdefault(teacher_id, student_id)
    return SpecialMap(
        to_teacher=to_teacher,
        kept=frozenset(kept),
        teacher_units=teacher_units,
        teacher_to_student=teacher_to_student,
        student_bytes=student_bytes,
        pairs=tuple(
            (student.strings[sid], teacher.strings[tid] if tid >= 0 else student_bytes[sid].decode("utf-8"))
            for sid, tid in sorted(chosen.items())
        ),
        mask=mask,
    )


def excluded_support(teacher: ByteTable, specials: SpecialMap, model_vocab_size: int) -> np.ndarray:
    """Teacher ids never offered as candidates, within the lm head's rows: unpaired specials, ids
    without bytes (empty tokens and ids no token owns, byte_tables.py) and padded rows."""
    excluded = teacher.special.copy()
    excluded[list(specials.teacher_to_student)] = False
    ids = np.flatnonzero(excluded[:model_vocab_size])
    return np.union1d(ids, np.arange(teacher.vocab_size, model_vocab_size)).astype(np.int64)
