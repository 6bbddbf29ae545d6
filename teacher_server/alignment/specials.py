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
teacher's distribution at that point of the text (cross.py), and its own token,
which the teacher never writes, gets the floor log-probability.

A pair may also name text that is plain for the teacher (its `<think>` is not a
special token): the student's special then stands for those bytes, and the
teacher reads and predicts them as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

SPECIAL_UNIT = 256  # units 256 + i stand for the i-th mapped teacher special token


@dataclass(frozen=True)
class SpecialVocab:
    """A tokenizer as special-token pairing sees it (ByteTable.special_vocab, TeacherVocabulary.special_vocab)."""

    vocab: Mapping[str, int]  # every token by string
    special: Mapping[str, int]  # its special (control) tokens by string


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

    def masked_targets(self, student: SpecialVocab) -> list[int]:
        """Student ids whose positions are masked SPECIAL: the specials not kept in the loss."""
        if not self.mask:
            return []
        return sorted(index for index in student.special.values() if index not in self.kept)


class PairError(ValueError):
    """A requested special-token pair that cannot be honoured."""


def special_map(
    student: SpecialVocab,
    teacher: SpecialVocab,
    student_eos: Sequence[str],
    teacher_eos_ids: Sequence[int],
    pairs: Sequence[tuple[str, str]] = (),
    pair_eos: bool = True,
    mask: bool = True,
) -> SpecialMap:
    """Pair the student's special tokens with the teacher's (module docstring). With one tokenizer
    on both sides every special is its own context-only twin, and the pairs are its kept tokens."""
    # Context-only twins: the same string special on both sides.
    to_teacher = {
        index: teacher.special[string] for string, index in student.special.items() if string in teacher.special
    }
    wanted, text_twins = _wanted_pairs(student, teacher, student_eos, teacher_eos_ids, pairs, pair_eos)
    chosen: dict[int, int] = dict(to_teacher) if not mask else {}  # no masking: twins stay in the loss
    chosen.update(wanted)  # a later (explicit) pair overrides the EOS default
    student_bytes: dict[int, bytes] = {}
    for student_id, teacher_id in chosen.items():
        if teacher_id >= 0:
            to_teacher[student_id] = teacher_id
        else:  # the teacher writes it as text: the student's control token stands for those bytes
            to_teacher.pop(student_id, None)
            student_bytes[student_id] = text_twins[student_id]
    teacher_units = {
        teacher_id: SPECIAL_UNIT + rank for rank, teacher_id in enumerate(sorted(set(to_teacher.values())))
    }
    teacher_to_student: dict[int, int] = {}
    for student_id in sorted(chosen):
        if student_id in to_teacher:
            teacher_to_student.setdefault(to_teacher[student_id], student_id)
    student_names = {student.vocab[token]: token for token in student_eos if token in student.vocab}
    student_names.update((index, string) for string, index in student.special.items())
    teacher_names = {index: string for string, index in teacher.special.items()}
    return SpecialMap(
        to_teacher=to_teacher,
        kept=frozenset(chosen),
        teacher_units=teacher_units,
        teacher_to_student=teacher_to_student,
        student_bytes=student_bytes,
        pairs=tuple(
            (student_names[sid], teacher_names[tid] if tid >= 0 else student_bytes[sid].decode("utf-8"))
            for sid, tid in sorted(chosen.items())
        ),
        mask=mask,
    )


def _wanted_pairs(
    student: SpecialVocab,
    teacher: SpecialVocab,
    student_eos: Sequence[str],
    teacher_eos_ids: Sequence[int],
    pairs: Sequence[tuple[str, str]],
    pair_eos: bool,
) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """The pairs kept in the loss, (student id, teacher id or -1 for text), and the text of each -1."""
    wanted: list[tuple[int, int]] = []
    if pair_eos and teacher_eos_ids:
        for token in student_eos:
            if token in student.vocab:  # an EOS of the teacher too pairs with itself, others with its first
                twin = teacher.special.get(token)
                wanted.append((student.vocab[token], twin if twin in teacher_eos_ids else int(teacher_eos_ids[0])))
    text_twins: dict[int, bytes] = {}
    for student_token, teacher_token in pairs:
        if student_token not in student.vocab:
            raise PairError(f"special-token pair: {student_token!r} is not in the student's vocabulary")
        if student_token not in student.special:
            raise PairError(
                f"special-token pair: {student_token!r} is not a special token of the student's tokenizer "
                "(plain tokens are always scored: they align by their bytes)"
            )
        if not teacher_token:
            raise PairError(f"special-token pair: empty teacher token for {student_token!r}")
        student_id = student.special[student_token]
        if teacher_token in teacher.special:
            wanted.append((student_id, teacher.special[teacher_token]))
        else:  # plain text for the teacher (one token of its vocabulary, or several)
            wanted.append((student_id, -1))
            text_twins[student_id] = teacher_token.encode("utf-8")
    return wanted, text_twins


def excluded_support(teacher_special_ids: np.ndarray, specials: SpecialMap, unavailable_rows: np.ndarray) -> np.ndarray:
    """Teacher ids never offered as support: special tokens not paired with a student token, and
    lm-head rows that no token can stand for (rows past the tokenizer, ids without bytes)."""
    paired = np.fromiter(specials.teacher_to_student, dtype=np.int64, count=len(specials.teacher_to_student))
    return np.union1d(np.setdiff1d(teacher_special_ids, paired), unavailable_rows).astype(np.int64)
