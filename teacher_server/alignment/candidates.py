"""The teacher's log-probability of ids the student names (ScoreRequest.candidate_ids), across tokenizers.

At a scored position, with b the last teacher boundary at or before it and r the bytes between
b and the position (align.py), the value of a student token c is the chain rule along the
teacher's own tokens of r + c's bytes, read from b: the teacher tokenizer's encoding of that
text, t_1 .. t_n, and the sum of log p(t_i | the teacher's sequence up to b, t_1 .. t_i-1).
Inside a teacher token (r not empty) it is conditioned on r by the mass the projection
conditions the position's support on (project.py), so that the support and the candidates
are one distribution's values (finish, in cross.py).

The tokens of a path that are the rollout's own teacher tokens are free (the main pass scores
them); of the rest, a single token is read at its row of the same pass (requested ids), and
longer rests are branches of that pass (engines/base.py): no extra pass. A candidate the
teacher cannot write (a student control token without a teacher twin, bytes the teacher's
tokenizer does not reproduce, a path past the teacher's context) is -inf.

So is a candidate other than the target that spells the beginning of the rollout's own text from
the position: the projection has already given the teacher's mass of that text to a support entry,
and a union of the two would count it twice (in the demo's cross-tokenizer study, up to twice the
teacher's mass at a position). A shorter one ("3" where the rollout writes "33", " represent"
before " representatives") is inside the target's entry; a longer one ("33" where the rollout
writes "3", "3") is in the entry of the token the student's tokenizer begins that text with
("33", project.py) or, where one teacher token of look-ahead cannot tell, in the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher_server.alignment.align import Alignment, student_units, teacher_tokens
from teacher_server.alignment.byte_tables import ByteTable
from teacher_server.alignment.specials import SpecialMap
from teacher_server.alignment.text import TeacherText
from teacher_server.engines.base import Branch, TeacherScores
from teacher_server.errors import InvalidArgument

# Branch tokens the candidates of one request may need, per requested candidate (plus a floor):
# most paths are one teacher token, read without a branch; a bound on abuse, not on real students.
BRANCH_TOKENS_PER_CANDIDATE = 8.0
BRANCH_TOKEN_FLOOR = 256


@dataclass
class CandidatePaths:
    """Teacher paths of the requested candidates of one request, each scored once."""

    slot: np.ndarray  # int64 [P, M]: the path of each candidate, -1 where the teacher cannot write it
    attach: np.ndarray  # int64 [N]: global teacher index each path starts at (its boundary b)
    on_rollout: np.ndarray  # int64 [N]: leading tokens that are the rollout's own (scored by the main pass)
    requested_ids: np.ndarray  # int64 [rows, W]: single rest tokens, read at their main row (-1 pad)
    requested_at: np.ndarray  # int64 [N]: (row, column) of a path's single rest token as row * W + column, else -1
    branches: tuple[Branch, ...]  # rests of two or more tokens
    branch_of: np.ndarray  # int64 [N]: the path's branch, -1 if none

    @property
    def branch_tokens(self) -> int:
        return sum(len(branch.token_ids) for branch in self.branches)


def candidate_paths(
    plan: Alignment,
    requested: np.ndarray,
    student: ByteTable,
    text: TeacherText,
    specials: SpecialMap,
    model_vocab_size: int,
    context: int,
) -> CandidatePaths:
    """The teacher path of every requested candidate at the positions to be projected; `context`:
    the teacher's context length, which a path must fit in."""
    slot = np.full(requested.shape, -1, dtype=np.int64)
    paths: dict[tuple[int, tuple[int, ...]], int] = {}
    encoded: dict[tuple[bytes, int], tuple[int, ...] | None] = {}
    units_of: dict[int, np.ndarray] = {}
    for p in np.flatnonzero(plan.reason == 0).tolist():
        row, start = int(plan.row[p]), int(plan.s[p])
        r = plan.units[plan.t_start[row] : start]
        attach = plan.teacher_from + row
        for m, c in enumerate(requested[p].tolist()):
            if c < 0:
                continue
            if c not in units_of:
                units_of[c] = student_units(np.asarray([c]), student, specials, strip_dummy=False)[0]
            units = units_of[c]
            if c != plan.targets[p] and np.array_equal(units, plan.units[start : start + len(units)]):
                continue  # another split of the rollout's own text: its mass is in the target's entry
            key = (r.tobytes(), c)
            if key not in encoded:
                encoded[key] = _teacher_path(r, units, text, specials, model_vocab_size)
            path = encoded[key]
            if path is not None and attach + len(path) <= context:
                slot[p, m] = paths.setdefault((attach, path), len(paths))
    attach = np.asarray([at for at, _ in paths], dtype=np.int64)
    tokens = [np.asarray(path, dtype=np.int64) for _, path in paths]
    return _scored_by_the_main_pass(plan, slot, attach, tokens)


def _teacher_path(
    r: np.ndarray, units: np.ndarray, text: TeacherText, specials: SpecialMap, model_vocab_size: int
) -> tuple[int, ...] | None:
    """The teacher's tokens of r + a candidate's units, or None where the teacher cannot write them."""
    if not len(units):  # a control token the teacher has no twin for
        return None
    stream = np.concatenate([r, units]).astype(np.uint16)
    if r.size and (units >= 256).any():  # a paired control token follows text only at a boundary
        return None
    ids, _lengths, reproduced = teacher_tokens(stream, text, specials)
    if reproduced < len(stream) or not len(ids) or int(ids.max()) >= model_vocab_size:
        return None
    return tuple(ids.tolist())


def _scored_by_the_main_pass(
    plan: Alignment, slot: np.ndarray, attach: np.ndarray, tokens: list[np.ndarray]
) -> CandidatePaths:
    """Split each path into the rollout's own tokens, then a single token or a branch."""
    sequence = plan.teacher_ids.astype(np.int64)
    rows = len(sequence) - plan.teacher_from
    on_rollout = np.zeros(len(tokens), dtype=np.int64)
    singles: dict[int, list[int]] = {}
    single_of: dict[int, tuple[int, int]] = {}
    branches: list[Branch] = []
    branch_of = np.full(len(tokens), -1, dtype=np.int64)
    for k, path in enumerate(tokens):
        at = int(attach[k])
        own = sequence[at : at + len(path)]
        same = own == path[: len(own)]
        on = len(own) if same.all() else int(np.argmin(same))
        on_rollout[k] = on
        rest, start = path[on:], at + on
        if len(rest) == 1 and start < len(sequence):
            row = singles.setdefault(start - plan.teacher_from, [])
            single_of[k] = (start - plan.teacher_from, len(row))
            row.append(int(rest[0]))
        elif len(rest):
            branch_of[k] = len(branches)
            branches.append(Branch(attach=start, token_ids=rest.astype(np.int32), row_after=False))
    width = max((len(ids) for ids in singles.values()), default=0)
    requested_ids = np.full((rows, width), -1, dtype=np.int64)
    for row, ids in singles.items():
        requested_ids[row, : len(ids)] = ids
    requested_at = np.full(len(tokens), -1, dtype=np.int64)
    for k, (row, column) in single_of.items():
        requested_at[k] = row * width + column
    return CandidatePaths(slot, attach, on_rollout, requested_ids, requested_at, tuple(branches), branch_of)


def check_branch_budget(paths: CandidatePaths, candidates: int) -> None:
    budget = BRANCH_TOKEN_FLOOR + int(BRANCH_TOKENS_PER_CANDIDATE * candidates)
    if paths.branch_tokens > budget:
        raise InvalidArgument(
            f"the candidate ids need {paths.branch_tokens} teacher branch tokens, over this request's budget of "
            f"{budget} ({BRANCH_TOKEN_FLOOR} + {BRANCH_TOKENS_PER_CANDIDATE:g} per candidate): send fewer candidates, "
            "or leave out ids whose text the teacher writes with many tokens"
        )


def path_logprobs(plan: Alignment, paths: CandidatePaths, scores: TeacherScores) -> np.ndarray:
    """float64 [N]: the chain rule along each path (module docstring), from the main pass's scores."""
    token_logp = np.asarray(scores.token_logprobs, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(token_logp)])
    first = paths.attach - plan.teacher_from
    value = cumulative[first + paths.on_rollout] - cumulative[first]
    single = np.flatnonzero(paths.requested_at >= 0)
    if len(single):
        requested = np.asarray(scores.requested_logprobs, dtype=np.float64).reshape(-1)
        value[single] += requested[paths.requested_at[single]]
    branched = np.flatnonzero(paths.branch_of >= 0)
    if len(branched):
        sizes = np.asarray([len(branch.token_ids) for branch in paths.branches])
        per_branch = np.add.reduceat(
            np.asarray(scores.branch_token_logprobs, dtype=np.float64), np.cumsum(sizes) - sizes
        )
        value[branched] += per_branch[paths.branch_of[branched]]
    return value
