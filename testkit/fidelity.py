"""Fidelity of cross-tokenizer scores against exact references, at every position of real texts.

Two references (DESIGN.md sections 6.5 and 8), both computed from the teacher's full
vocabulary (log-softmax in float64, rows kept in float32), independently of the projection:

* **chain rule**: at a student position whose target starts and ends on teacher token
  boundaries, the exact teacher log-probability of the student's token is the sum of the
  teacher log-probabilities of the rollout's teacher tokens it spans. Compared with the
  returned `token_logprobs` at every such position.
* **brute force**: at any position, with b the last teacher boundary at or before the
  position and r the bytes between b and it, the teacher's distribution over the student's
  next token, from the teacher alone: every teacher token path from b that writes r and then
  text w, followed until w's first word is finished, its probability given to the first token
  of the student tokenizer's own encoding of w (BruteForce). Renormalised over the returned
  support and compared with it by total variation; `covered` is the share of that
  distribution the support holds, `reference_unsettled` the share the reference gave from a
  word it stopped following (below LOOKAHEAD).

Teacher rows come from `ModelRows` (a Hugging Face model: one pass over the
teacher sequence, then batched branch passes on its KV cache) or `BigramRows` (the
stand-in teachers of testkit/tokenizers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from teacher_server.alignment.pair import BYTE_CLASS, LETTER, OTHER, SPACE
from teacher_server.alignment.result import Coverage

BRANCH_CHUNK = 512  # branch tokens per pass of ModelRows
KINDS = ("one-to-one", "several", "shorter", "inside")  # see position_kinds


class ModelRows:
    """Full-vocabulary float64 log-probabilities of an HFEngine's model after teacher_ids[:at] + extra."""

    def __init__(self, engine, teacher_ids: np.ndarray) -> None:
        import torch

        self.torch, self.engine = torch, engine
        with torch.inference_mode():
            ids = torch.from_numpy(np.asarray(teacher_ids, dtype=np.int64))[None]
            out = engine.backbone(input_ids=ids, use_cache=True)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.hidden = out.last_hidden_state[0]
        self.length = len(teacher_ids)

    def rows(self, contexts: list[tuple[int, tuple[int, ...]]]) -> list[np.ndarray]:
        """One row per (at, extra); the branches run BRANCH_CHUNK tokens per pass on the KV cache."""
        torch = self.torch
        with torch.inference_mode():
            states = self._branch_states(contexts)
            hidden = torch.stack([states[c][-1] if c[1] else self.hidden[c[0] - 1] for c in contexts])
            out = []
            for start in range(0, len(contexts), BRANCH_CHUNK):
                logits = self.engine.lm_head(hidden[start : start + BRANCH_CHUNK]).double()
                out += list(torch.log_softmax(logits, -1).float().numpy())
            return out

    def path_logprobs(self, paths: list[tuple[int, tuple[int, ...]]]) -> list[float]:
        """The chain rule along each (at, tokens): sum of log p(tokens[i] | teacher_ids[:at] + tokens[:i]),
        each path one branch on the KV cache, full-vocabulary float64 rows."""
        torch = self.torch
        value = {}
        with torch.inference_mode():
            states = self._branch_states(paths)
            for at, tokens in states:
                before = torch.cat([self.hidden[at - 1 : at], states[(at, tokens)][:-1]])
                rows = torch.log_softmax(self.engine.lm_head(before).double(), -1)
                value[(at, tokens)] = float(rows[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
        return [value.get(path, 0.0) for path in paths]

    def _branch_states(self, branches: list[tuple[int, tuple[int, ...]]]) -> dict:
        """Hidden states [len(extra), H] of each distinct (at, extra) with extra tokens, BRANCH_CHUNK
        tokens per pass."""
        states = {}
        todo = [branch for branch in dict.fromkeys(branches) if branch[1]]
        while todo:
            chunk = [todo.pop()]
            width = len(chunk[0][1])
            while todo and width + len(todo[-1][1]) <= BRANCH_CHUNK:
                chunk.append(todo.pop())
                width += len(chunk[-1][1])
            states.update(self._branches(chunk, width))
        return states

    def _branches(self, chunk, width: int) -> dict:
        torch, length, engine = self.torch, self.length, self.engine
        ids = torch.zeros((1, width), dtype=torch.long)
        positions = torch.zeros((1, width), dtype=torch.long)
        allowed = torch.zeros((1, 1, width, length + width), dtype=torch.bool)
        start, spans = 0, {}
        for at, extra in chunk:
            n = len(extra)
            ids[0, start : start + n] = torch.tensor(extra)
            positions[0, start : start + n] = at + torch.arange(n)
            allowed[0, 0, start : start + n, :at] = True
            allowed[0, 0, start : start + n, length + start : length + start + n] = torch.ones(n, n).tril().bool()
            spans[(at, extra)] = (start, start + n)
            start += n
        dtype = (
            self.hidden.dtype
        )  # the model's, as the engine builds it (a float32 one gave a float64 model wrong rows)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = engine.backbone(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{engine._cache_argument: self.cache},
        ).last_hidden_state[0]
        self.cache.crop(-width)  # the branch tokens go: the teacher sequence stays as it was
        return {key: out[begin:end] for key, (begin, end) in spans.items()}


class BigramRows:
    """Rows of a BigramTeacher (testkit/tokenizers.py): they depend on the last token only."""

    def __init__(self, engine, teacher_ids: np.ndarray) -> None:
        self.engine, self.teacher_ids = engine, teacher_ids

    def rows(self, contexts: list[tuple[int, tuple[int, ...]]]) -> list[np.ndarray]:
        return [
            self.engine.distribution(int(extra[-1] if extra else self.teacher_ids[at - 1])) for at, extra in contexts
        ]


def first_word(text: bytes) -> tuple[int, bool]:
    """The class of the text's first word (pair.BYTE_CLASS) and whether the text is past its end.

    A word is a run of one class (letters, with any non-ASCII byte; digits; whitespace; other)
    after at most one leading space or punctuation mark before letters (" total", "/min"): the
    pre-tokenizers' unit, and BPE merges within it. Pre-tokenizers also attach newlines to
    punctuation (Tekken's ".\n\n") and look one character past a run of spaces (GPT-2's "\n\n"
    before a word is "\n", "\n"), so the text is past the first word once it has changed class
    twice after it began."""
    classes = BYTE_CLASS[np.frombuffer(text, np.uint8)]
    lead = len(text) > 1 and (
        (text[:1] == b" " and classes[1] != SPACE) or (classes[0] == OTHER and classes[1] == LETTER)
    )
    rest = classes[int(lead) :]
    return int(rest[0]), bool(np.count_nonzero(rest[1:] != rest[:-1]) >= 2)


class StudentFirstToken:
    """The first token of the student tokenizer's encoding of a text (pair.first_tokens), cached;
    the longest student token the bytes begin with where that is undefined (not UTF-8 text)."""

    def __init__(self, cross) -> None:
        from teacher_server.alignment.text import plain_encoder

        self.student, self.trie = cross.student, cross.tables.trie
        self.encoder = plain_encoder(self.student.tokenizer_json) if self.student.tokenizer_json else None
        self.cache: dict[bytes, int] = {}

    def of(self, texts: list[bytes]) -> list[int]:
        from teacher_server.alignment.pair import first_tokens

        todo = [text for text in dict.fromkeys(texts) if text not in self.cache]
        if todo:
            first = (
                first_tokens(self.student, self.trie, self.encoder, todo) if self.encoder else np.full(len(todo), -1)
            )
            data = np.frombuffer(b"".join(todo), np.uint8).astype(np.int64)
            ends = np.cumsum([len(text) for text in todo])
            _, longest, _ = self.trie.walk(np.zeros(len(todo), np.int64), data, ends - [len(t) for t in todo], ends)
            self.cache.update(zip(todo, np.where(first >= 0, first, longest).tolist()))
        return [self.cache[text] for text in texts]


@dataclass
class Target:
    """The brute-force distribution of one position: the teacher's texts after r, by first student token."""

    at: int  # the teacher boundary b (an index into the teacher sequence)
    r: bytes
    scale: float = 1.0  # P(r): the thresholds are shares of it
    mass: dict[int, float] = field(default_factory=dict)  # student token -> teacher probability
    unsettled: float = 0.0  # mass given by a text whose first word it had not finished

    def add(self, token: int, probability: float, settled: bool = True) -> None:
        self.mass[token] = self.mass.get(token, 0.0) + probability
        self.unsettled += 0.0 if settled else probability


@dataclass
class Path:
    target: Target
    tokens: tuple[int, ...]  # teacher tokens after b
    probability: float
    text: bytes | None  # what it wrote after r; None while it is still writing r
    need: bytes = b""  # the bytes of r it has still to write


class BruteForce:
    """Teacher distributions over student tokens, straight from the teacher's full vocabulary.

    Every teacher token path from b that writes r (tokens longer than r, prefixes of r followed
    by more) and then text w is followed until w's first word is finished (first_word), and its
    probability goes to the first token of the student tokenizer's encoding of w. A path less
    probable than LOOKAHEAD x P(r) is not followed further: it goes to the first token of what it
    has written (`unsettled` counts that mass); its continuations below EXACT are grouped by their
    first byte (exact for those that begin a new word, unsettled for the others). The student's paired specials (its EOS) get P(exactly r, then the teacher's twin)."""

    PRUNE = 1e-6  # paths below this share of P(r) are dropped
    LOOKAHEAD = 1e-3  # unfinished words at least this probable (share of P(r)) are followed
    EXACT = 1e-5  # continuations below this share lump into what their path wrote so far
    MAX_TOKENS = 8

    def __init__(self, cross, rows) -> None:
        table = cross.text.table
        self.rows, self.first = rows, StudentFirstToken(cross)
        self.tokens = table.tokens
        self.writes = table.lengths > 0
        self.writes[cross.excluded[cross.excluded < len(self.writes)]] = False
        self.writes &= ~table.special
        self.first_byte = np.asarray([token[0] if token else 0 for token in table.tokens], dtype=np.int64)
        self.twins = {t: s for t, s in cross.specials.teacher_to_student.items()}

    def targets(self, positions: list[tuple[int, bytes]]) -> list[Target]:
        """The distribution at each (b, r)."""
        found = [Target(at, r) for at, r in positions]
        frontier = [Path(target, (), 1.0, None, target.r) for target in found]
        while frontier:
            following: list[Path] = []
            for start in range(0, len(frontier), 256):
                chunk = frontier[start : start + 256]
                rows = self.rows.rows([(path.target.at, path.tokens) for path in chunk])
                for path, row in zip(chunk, rows):
                    following += self._expand(path, np.exp(row.astype(np.float64)))
            frontier = following
        return found

    def _expand(self, path: Path, p: np.ndarray) -> list[Path]:
        target = path.target
        if path.text is None:
            if not path.tokens:  # the row at b: P(r) is the mass of the tokens consistent with r
                target.scale = max(self._consistent(p, path.need).sum(), 1e-300) if path.need else 1.0
            return self._write_r(path, p)
        return self._continue_word(path, p)

    def _consistent(self, p: np.ndarray, need: bytes) -> np.ndarray:
        some = np.flatnonzero(self.writes & (p > self.PRUNE * 1e-3))
        return np.asarray(
            [p[i] for i in some.tolist() if self.tokens[i].startswith(need) or need.startswith(self.tokens[i])]
        )

    def _write_r(self, path: Path, p: np.ndarray) -> list[Path]:
        target, need = path.target, path.need
        chosen = np.flatnonzero(self.writes & (path.probability * p >= self.PRUNE * target.scale))
        if not need:
            for twin, student in self.twins.items():
                target.add(student, path.probability * p[twin])
        out, placed = [], []
        for i in chosen.tolist():
            token = self.tokens[i]
            if need and not (token.startswith(need) or need.startswith(token)):
                continue
            if len(token) > len(need):
                placed.append((i, token[len(need) :]))
            elif len(path.tokens) < self.MAX_TOKENS:  # a prefix of what r still needs
                out.append(Path(target, path.tokens + (i,), path.probability * p[i], None, need[len(token) :]))
        return out + self._settle(path, [(i, path.probability * p[i], w) for i, w in placed])

    def _continue_word(self, path: Path, p: np.ndarray) -> list[Path]:
        """The next token after an unfinished word: the probable ones are followed or settled
        (_settle); below EXACT, one counts by its first byte, all the first token can see of one
        that begins a new word (for one that goes on with the word an approximation: unsettled);
        below PRUNE, as what the path wrote so far (unsettled)."""
        target, text = path.target, path.text
        kind, _ = first_word(text)
        weighted = path.probability * p
        exact = self.writes & (weighted >= self.EXACT * target.scale)
        small = self.writes & ~exact & (weighted >= self.PRUNE * target.scale)
        continues = (BYTE_CLASS[self.first_byte] == kind) | (text == b" ")
        for grouped, settled in ((small & ~continues, True), (small & continues, False)):
            by_byte = np.bincount(self.first_byte[grouped], weights=weighted[grouped], minlength=256)
            bytes_seen = np.flatnonzero(by_byte > 0).tolist()
            for byte, first in zip(bytes_seen, self.first.of([text + bytes([b]) for b in bytes_seen])):
                target.add(first, by_byte[byte], settled)
        (own,) = self.first.of([text])
        target.add(own, float(weighted[~self.writes].sum()))  # the text ends (a special token)
        target.add(own, float(weighted[self.writes & ~exact & ~small].sum()), settled=False)
        chosen = np.flatnonzero(exact).tolist()
        return self._settle(path, [(i, weighted[i], text + self.tokens[i]) for i in chosen])

    def _settle(self, path: Path, written: list[tuple[int, float, bytes]]) -> list[Path]:
        """Paths that wrote text: follow the unfinished probable ones, give the rest their first token."""
        target, out, done = path.target, [], []
        for i, probability, text in written:
            finished = first_word(text)[1]
            if not finished and probability >= self.LOOKAHEAD * target.scale and len(path.tokens) < self.MAX_TOKENS:
                out.append(Path(target, path.tokens + (i,), probability, text))
            else:
                done.append((probability, text, finished))
        for (probability, _, finished), first in zip(done, self.first.of([text for _, text, _ in done])):
            target.add(first, probability, settled=finished)
        return out


def position_kinds(plan) -> np.ndarray:
    """Each position's kind (an index into KINDS): its target is one teacher token, spans several,
    ends inside the teacher token it starts (all three start on a teacher boundary), or starts inside one."""
    row = np.maximum(plan.row, 0)
    first_end = plan.t_end[np.minimum(row, len(plan.t_end) - 1)] if len(plan.t_end) else np.zeros_like(row)
    kind = np.where(plan.e == first_end, 0, np.where(plan.e > first_end, 1, 2))
    return np.where(plan.rho > 0, 3, kind)


def on_boundaries(plan) -> np.ndarray:
    """Positions whose target starts and ends on teacher token boundaries."""
    return (plan.rho == 0) & (plan.row >= 0) & np.isin(plan.e, plan.t_end)


@dataclass
class Fidelity:
    """Per-position figures of one tokenizer pair."""

    chain_diff: list = field(default_factory=list)  # |token_logprob - chain rule| at boundary positions
    boundary_masked: int = 0  # boundary positions the response masked (no comparison)
    entry_excess: list = field(default_factory=list)  # log support entry of the target - chain rule, same positions
    tv: list = field(default_factory=list)
    covered: list = field(default_factory=list)
    unsettled: list = field(default_factory=list)  # share of the reference's mass from unfinished words
    kind: list = field(default_factory=list)
    positions: int = 0
    coverage: Coverage = field(default_factory=Coverage)  # the responses' own counts, summed

    def summary(self) -> dict:
        chain, tv, kind = np.asarray(self.chain_diff), np.asarray(self.tv), np.asarray(self.kind, dtype=np.int64)
        out = {
            "positions": self.positions,
            "coverage": self.coverage.coverage,
            "retained_mass": self.coverage.mean_retained_mass,
            "boundary_positions": len(chain),
            "boundary_masked": self.boundary_masked,
        }
        if len(chain):
            out |= {
                "chain_mean": float(chain.mean()),
                "chain_p99": float(np.quantile(chain, 0.99)),
                "chain_share_over_0.05": float((chain > 0.05).mean()),
                "chain_max": float(chain.max()),
            }
            excess = np.asarray(self.entry_excess)
            out |= {"entry_excess_mean": float(excess.mean()), "entry_share_over_0.05": float((excess > 0.05).mean())}
        if len(tv):
            out |= {
                "tv_positions": len(tv),
                "tv_mean": float(tv.mean()),
                "tv_p99": float(np.quantile(tv, 0.99)),
                "covered_mean": float(np.mean(self.covered)),
                "reference_unsettled": float(np.mean(self.unsettled)),
            }
            for index, name in enumerate(KINDS):
                chosen = kind == index
                if chosen.any():
                    out[f"tv_{name}"] = (
                        int(chosen.sum()),
                        float(tv[chosen].mean()),
                        float(np.quantile(tv[chosen], 0.99)),
                    )
        return out


def measure(
    cross, engine, rows_of, tokenizer, examples, top_k: int = 32, tv_positions: int = 500, chat: bool = True
) -> Fidelity:
    """Score each GSM8K example (question as the prompt, answer as the completion) and compare:
    the chain rule at every boundary position of every example, brute force at the first
    `tv_positions` positions with a distribution (mask 1), in order."""
    found = Fidelity()
    for example in examples:
        prompt = tokenizer(example["question"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        messages = [("user", example["question"])] if chat else []
        tokens = np.asarray(prompt + completion)
        result = cross.score(engine, tokens, len(prompt), top_k, messages=messages)
        plan = cross.align(tokens, len(prompt), messages)
        rows = rows_of(engine, plan.teacher_ids)
        found.positions += len(result.mask)
        found.coverage.add(result.counts)
        _chain_rule(found, plan, result, rows)
        if len(found.tv) < tv_positions:
            _brute_force(found, BruteForce(cross, rows), plan, result, tv_positions - len(found.tv))
    return found


def _chain_rule(found: Fidelity, plan, result, rows) -> None:
    boundary = on_boundaries(plan)
    found.boundary_masked += int((boundary & (result.mask == 0) & (plan.reason == 0)).sum())
    chosen = np.flatnonzero(boundary & (result.mask == 1))
    if not len(chosen):
        return
    start = plan.teacher_from
    count = len(plan.t_end)
    table = rows.rows([(start + i, ()) for i in range(count)])
    token_logp = np.asarray([table[i][plan.teacher_ids[start + i]] for i in range(count)])
    cumulative = np.concatenate([[0.0], np.cumsum(token_logp)])
    last = np.searchsorted(plan.t_end, plan.e[chosen])
    reference = cumulative[last + 1] - cumulative[plan.row[chosen]]
    found.chain_diff += np.abs(result.token_logprobs[chosen].astype(np.float64) - reference).tolist()
    # The target's own support entry: the chain rule plus the teacher paths that write the same
    # text by other tokens, less the teacher's words that go on past the target (the student
    # writes those otherwise); far above it means other text landed on the target.
    entry = result.ids[chosen] == plan.targets[chosen, None]
    listed = entry.any(axis=1)
    logp = result.logprobs[chosen][entry].astype(np.float64)
    found.entry_excess += (logp - reference[listed]).tolist()


def _brute_force(found: Fidelity, reference: BruteForce, plan, result, count: int) -> None:
    kinds = position_kinds(plan)
    chosen = np.flatnonzero(result.mask == 1)[:count].tolist()
    positions = [
        (
            plan.teacher_from + int(plan.row[p]),
            plan.units[plan.s[p] - plan.rho[p] : plan.s[p]].astype(np.uint8).tobytes(),
        )
        for p in chosen
    ]
    for p, target in zip(chosen, reference.targets(positions)):
        ids = result.ids[p][result.ids[p] >= 0].tolist()
        brute = np.asarray([target.mass.get(v, 0.0) for v in ids])
        total = sum(target.mass.values())
        if brute.sum() <= 0:
            continue
        projected = np.exp(result.logprobs[p][: len(ids)].astype(np.float64))
        found.tv.append(0.5 * np.abs(projected / projected.sum() - brute / brute.sum()).sum())
        found.covered.append(min(brute.sum() / total, 1.0))
        found.unsettled.append(target.unsettled / total)
        found.kind.append(int(kinds[p]))
