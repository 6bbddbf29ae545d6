"""The teacher's values at requested candidate ids in a cross-tokenizer session against brute force.

For every candidate at every position of real texts (candidates.py gives the definition): the
teacher tokenizer's own encoding of r + the candidate's bytes (the transformers tokenizer, not
the server's encoder), scored token by token with the teacher's full-vocabulary float64 rows
(fidelity.ModelRows.path_logprobs: the model's forward on the teacher sequence, then each
path's tokens as one branch on its KV cache), against the returned value plus the log of the mass the
position is conditioned on (ScoreResult.conditioning). Candidates per position: the student's
target, the first entries of the returned support, random student tokens, and student tokens
that begin with the target's first byte (paths across several teacher tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from testkit.fidelity import ModelRows

TOLERANCE = 1e-4  # nats


@dataclass
class CandidateCheck:
    diff: dict[str, list[float]] = field(default_factory=lambda: {"on": [], "inside": [], "across": []})
    impossible_agree: int = 0  # -inf where the reference cannot write the candidate either
    own_text: int = 0  # another split of the rollout's own text: -inf by definition (candidates.py)
    own_text_finite: int = 0  # ... but a finite value came back
    impossible_disagree: int = 0  # -inf on one side only
    not_text: int = 0  # r + candidate bytes not UTF-8: no independent reference (left out)
    branch_tokens: int = 0
    candidates: int = 0

    def summary(self) -> dict:
        out = {
            "candidates": self.candidates,
            "not_text": self.not_text,
            "impossible_agree": self.impossible_agree,
            "impossible_disagree": self.impossible_disagree,
            "own_text": self.own_text,
            "own_text_finite": self.own_text_finite,
            "branch_tokens_per_candidate": round(self.branch_tokens / max(self.candidates, 1), 3),
        }
        for kind, values in self.diff.items():
            array = np.asarray(values or [0.0])
            out[kind] = {
                "n": len(values),
                "mean": float(array.mean()),
                "p99": float(np.percentile(array, 99)),
                "max": float(array.max()),
                "share_over_tol": float((array > TOLERANCE).mean()) if values else 0.0,
            }
        return out


def chosen_candidates(result, plan, student_table, rng: np.random.Generator, width: int) -> np.ndarray:
    """[P, width] student ids per position (see the module docstring), -1 padded: a third of the
    width from the support, a third random, a third beginning with the target's first byte."""
    third = max(width // 3, 1)
    vocab = student_table.vocab_size
    text_ids = np.flatnonzero(~student_table.special & (student_table.lengths > 0))
    first_byte = student_table.data[np.minimum(student_table.starts[:-1], len(student_table.data) - 1)]
    out = np.full((len(plan.targets), width), -1, dtype=np.int64)
    for p, target in enumerate(plan.targets.tolist()):
        picks = [target, *result.ids[p, : third - 1].tolist(), *rng.choice(text_ids, third).tolist()]
        if 0 <= target < vocab and student_table.lengths[target] > 0:
            same_start = text_ids[first_byte[text_ids] == first_byte[target]]
            longest = same_start[np.argsort(-student_table.lengths[same_start])[:40]]
            picks += rng.choice(longest, min(third, len(longest)), replace=False).tolist()
        picks = [c for c in dict.fromkeys(picks) if c >= 0][:width]
        out[p, : len(picks)] = picks
    return out


def check_example(
    found: CandidateCheck, cross, engine, teacher_tokenizer, tokens, score_from, messages, rng, width: int = 12
) -> None:
    """Score one rollout with `width` candidates per position and compare every value with brute force."""
    plan = cross.align(tokens, score_from, messages)
    plain = cross.score(engine, tokens, score_from, 8, messages=messages)
    requested = chosen_candidates(plain, plan, cross.student, rng, width)
    result = cross.score(engine, tokens, score_from, 8, messages=messages, requested_ids=requested)
    found.branch_tokens += int(result.counts.branch_tokens) - int(plain.counts.branch_tokens)
    wanted = []  # (kind, returned value + conditioning, attach, path)
    for p in np.flatnonzero(result.mask == 1).tolist():
        row = int(plan.row[p])
        r = plan.units[plan.t_start[row] : plan.s[p]].astype(np.uint8).tobytes()
        attach = plan.teacher_from + row
        for m, c in enumerate(requested[p].tolist()):
            if c < 0 or cross.student.special[c]:
                continue
            found.candidates += 1
            got = float(result.requested_logprobs[p, m])
            rest = plan.units[plan.s[p] : plan.num_units].astype(np.uint8).tobytes()
            if c != plan.targets[p] and rest.startswith(cross.student.token(c)):
                found.own_text += 1
                found.own_text_finite += bool(np.isfinite(got))
                continue
            try:
                text = (r + cross.student.token(c)).decode("utf-8")
            except UnicodeDecodeError:
                found.not_text += 1
                continue
            path = tuple(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
            writes = teacher_tokenizer.decode(path, clean_up_tokenization_spaces=False) == text
            writes &= attach + len(path) <= engine.max_sequence_length
            if not np.isfinite(got) or not writes:
                same = not np.isfinite(got) and not writes
                found.impossible_agree += same
                found.impossible_disagree += not same
                continue
            kind = "inside" if plan.rho[p] > 0 else ("across" if len(path) > 1 else "on")
            wanted.append((kind, got + float(result.conditioning[p]), attach, path))
    references = ModelRows(engine, plan.teacher_ids).path_logprobs([(attach, path) for _, _, attach, path in wanted])
    for (kind, got, _, _), reference in zip(wanted, references):
        found.diff[kind].append(abs(got - reference))
