"""Byte alignment of one rollout: student ids in, teacher ids and index maps out.

DESIGN.md section 6, steps 2 and 3. The completion becomes a stream of units:
its bytes (0..255) and one unit per paired special token (256 + i, see
specials.py); unpaired student specials take no room. The teacher tokenizes the
same stream (its own rendering of the prompt goes before it), and every scored
student position t gets:

* `s`, `e`: the units of its target token (the prefix ends at s);
* `row`: the completion teacher token that contains unit s (the last teacher
  boundary at or before s is that token's start);
* `rho`: s minus that boundary, the partial bytes r the teacher candidates at the
  boundary must begin with (0 when s is a teacher boundary).

All of it is cumsum/repeat/searchsorted over arrays: no Python loop per token,
except one per text run between paired specials when the teacher tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.specials import SpecialMap
from teacher_server.alignment.text import TeacherText

SPECIAL = teacher_pb2.MASK_REASON_SPECIAL
UNALIGNED = teacher_pb2.MASK_REASON_UNALIGNED
END_UNIT = 0xFFFF  # pads the stream: equal to no token unit
TAIL = 64  # END_UNIT padding after the stream, so fixed-width windows never run off it


@dataclass(eq=False)
class Alignment:
    teacher_ids: np.ndarray  # int32 [M]: the teacher's sequence (prompt, then completion)
    teacher_from: int  # index of the first completion teacher token (>= 1)
    units: np.ndarray  # uint16 [U + TAIL]: the completion stream, END_UNIT after it
    num_units: int
    t_start: np.ndarray  # int64 [Mc]: first unit of each completion teacher token
    t_end: np.ndarray  # int64 [Mc]
    targets: np.ndarray  # int64 [P]: student target ids
    s: np.ndarray  # int64 [P]
    e: np.ndarray  # int64 [P]
    row: np.ndarray  # int64 [P]: completion teacher token holding unit s, -1 if none
    rho: np.ndarray  # int64 [P]
    reason: np.ndarray  # uint8 [P]: SPECIAL / UNALIGNED decided here, 0 = to be projected

    @property
    def num_positions(self) -> int:
        return len(self.targets)


def student_units(
    tokens: np.ndarray, table: ByteTable, specials: SpecialMap, strip_dummy: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The units of `tokens` back to back, and each token's start (length len(tokens) + 1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lengths = table.lengths[tokens].copy()
    special_units = np.zeros(len(tokens), dtype=np.int64)
    for student_id, unit in (
        (s, specials.unit_of_student(s)) for s in np.unique(tokens[table.special[tokens]]).tolist()
    ):
        if unit is not None:
            where = tokens == student_id
            lengths[where] = 1
            special_units[where] = unit
    text_twins = {sid: raw for sid, raw in specials.student_bytes.items() if np.any(tokens == sid)}
    for student_id, raw in text_twins.items():
        lengths[tokens == student_id] = len(raw)
    skip = np.zeros(len(tokens), dtype=np.int64)
    if strip_dummy and table.dummy_prefix:
        # The tokenizer put a space before the text: the decoder drops it, so does the stream.
        content = np.flatnonzero(~table.special[tokens])
        if len(content) and table.token(tokens[content[0]])[:1] == b" ":
            skip[content[0]] = 1
            lengths[content[0]] -= 1
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    source = np.repeat(table.starts[tokens] + skip - offsets[:-1], lengths) + np.arange(offsets[-1])
    units = (
        table.data[np.minimum(source, max(len(table.data) - 1, 0))].astype(np.uint16)
        if len(source)
        else np.zeros(0, np.uint16)
    )
    mapped = np.flatnonzero(special_units)
    units[offsets[mapped]] = special_units[mapped]
    for student_id, raw in text_twins.items():
        for start in offsets[:-1][tokens == student_id].tolist():
            units[start : start + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return units, offsets


def teacher_tokens(units: np.ndarray, text: TeacherText, specials: SpecialMap) -> tuple[np.ndarray, np.ndarray, int]:
    """Teacher ids for a unit stream, their unit lengths, and how many units they reproduce.

    Runs of bytes are tokenized by the teacher; a special unit is its teacher token.
    """
    unit_to_teacher = {unit: teacher_id for teacher_id, unit in specials.teacher_units.items()}
    breaks = np.flatnonzero(units >= 256)
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    done = 0
    for stop in [*breaks.tolist(), len(units)]:
        if stop > done:
            run = units[done:stop].astype(np.uint8).tobytes()
            run_ids, good = text.encode(run)
            run_lengths = text.table.lengths[run_ids]
            if good < len(run):  # keep the tokens that reproduce the text exactly, stop there
                keep = int(np.searchsorted(np.cumsum(run_lengths), good, side="right"))
                ids.append(run_ids[:keep])
                lengths.append(run_lengths[:keep])
                return np.concatenate(ids), np.concatenate(lengths), done + int(run_lengths[:keep].sum())
            ids.append(run_ids)
            lengths.append(run_lengths)
        if stop < len(units):
            ids.append(np.asarray([unit_to_teacher[int(units[stop])]], dtype=np.int64))
            lengths.append(np.ones(1, dtype=np.int64))
        done = stop + 1
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), len(units)
    return np.concatenate(ids), np.concatenate(lengths), len(units)


def align(
    tokens: np.ndarray,
    score_from: int,
    student: ByteTable,
    text: TeacherText,
    specials: SpecialMap,
    messages: Sequence[tuple[str, str]] = (),
    teacher_prompt_ids: np.ndarray | None = None,
) -> Alignment:
    """Align one rollout (student ids, prompt = tokens[:score_from]) with the teacher; the
    teacher reads its prompt from `teacher_prompt_ids` (its own ids) or `messages` (its chat
    template) instead when given."""
    tokens = np.asarray(tokens, dtype=np.int64)
    units, offsets = student_units(tokens, student, specials, strip_dummy=True)
    prompt_end = offsets[score_from]
    completion = units[prompt_end:]

    if teacher_prompt_ids is not None:
        prompt_ids = np.asarray(teacher_prompt_ids, dtype=np.int64)
    elif messages:
        prompt_ids = text.chat.encode_chat(messages)
    else:
        prompt_ids = _teacher_prompt(units[:prompt_end], text, specials)
    if len(prompt_ids) == 0:
        prompt_ids = text.start_ids()
    if len(prompt_ids) == 0:  # the teacher needs one token before the first scored one
        fallback = [
            i
            for i in (text.table.ids.get(text.chat.bos_token or ""), text.table.ids.get(text.chat.eos_token or ""))
            if i is not None
        ]
        prompt_ids = np.asarray(fallback[:1] or [0], dtype=np.int64)
    completion_ids, completion_lengths, trusted = teacher_tokens(completion, text, specials)

    t_end = np.cumsum(completion_lengths)
    t_start = t_end - completion_lengths
    starts = offsets[score_from:-1] - prompt_end
    ends = offsets[score_from + 1 :] - prompt_end
    targets = tokens[score_from:]
    row = np.searchsorted(t_end, starts, side="right")
    row = np.where(row < len(t_end), row, -1)
    # The teacher may reproduce none of the completion (a metaspace teacher cannot write a literal
    # "\u2581"): then there is no row at all and every position is UNALIGNED below.
    rho = np.where(row >= 0, starts - np.append(t_start, 0)[np.maximum(row, 0)], 0)

    reason = _reasons(targets, row, ends, trusted, student, specials)
    stream = np.concatenate([completion, np.full(TAIL, END_UNIT, dtype=np.uint16)])
    return Alignment(
        teacher_ids=np.concatenate([prompt_ids, completion_ids]).astype(np.int32),
        teacher_from=len(prompt_ids),
        units=stream,
        num_units=len(completion),
        t_start=t_start,
        t_end=t_end,
        targets=targets,
        s=starts,
        e=ends,
        row=row,
        rho=rho,
        reason=reason,
    )


def _reasons(
    targets: np.ndarray, row: np.ndarray, ends: np.ndarray, trusted: int, student: ByteTable, specials: SpecialMap
) -> np.ndarray:
    """UNALIGNED where no teacher row holds the position or its bytes run past what the teacher's
    tokens reproduce; SPECIAL for dropped special targets and the position after a dropped one."""
    reason = np.zeros(len(targets), dtype=np.uint8)
    is_special = student.special[targets] & ~np.isin(targets, list(specials.kept))
    # Right after a student control token that the teacher's text leaves out (a <think>), the
    # teacher reads text run together ("assistant\n\n12", "42The"): its judgement of that first
    # target is about the missing token, not the student's text. Masked as SPECIAL too.
    dropped = student.special[targets] & ~np.isin(targets, [*specials.to_teacher, *specials.student_bytes])
    after_dropped = np.zeros(len(targets), dtype=bool)
    after_dropped[1:] = dropped[:-1]
    reason[(row < 0) | (ends > trusted)] = UNALIGNED
    # Without masking these are only set aside from the projection (cross.py fills them in).
    reason[is_special | (after_dropped & specials.mask)] = SPECIAL
    return reason


def _teacher_prompt(units: np.ndarray, text: TeacherText, specials: SpecialMap) -> np.ndarray:
    """The student's prompt in teacher tokens: its start tokens, then the prompt's units."""
    start = text.start_ids()
    ids, _lengths, _trusted = teacher_tokens(units, text, specials)
    if len(start) and len(ids) and ids[0] == start[0]:
        start = start[:0]  # the student's own BOS was mapped onto the teacher's
    return np.concatenate([start, ids]).astype(np.int64)
