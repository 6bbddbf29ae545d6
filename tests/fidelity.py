"""Fidelity of cross-tokenizer scores against exact references, at every position of real texts.

Two references (DESIGN.md sections 6.5 and 8), both computed from the teacher's full
vocabulary (log-softmax in float64, rows kept in float32), independently of the projection:

* **chain rule**: at a student position whose target starts and ends on teacher token
  boundaries, the exact teacher log-probability of the student's token is the sum of the
  teacher log-probabilities of the rollout's teacher tokens it spans. Compared with the
  returned `token_logprobs` at every such position.
* **brute force**: at any position, with b the last teacher boundary at or before the
  position and r the bytes between b and it, each student token v of the returned support
  is scored directly from the teacher: P(the teacher's text after b begins with
  r + bytes(v) and with no longer student token), each text's probability summed over
  every teacher token path that writes it (a last token that runs past it counts in full;
  paths and texts below PRUNE are dropped). That is the student token the text begins with
  when the student takes the longest match; a partition among the support's candidates
  alone would credit a lone space " " with every word outside the support. Both
  distributions are renormalised over the support and compared by total variation.
  `covered` is the brute-force share of the texts after r whose longest student token is
  in the support. Where the student's BPE does not take the longest match (SentencePiece
  writes " bolts" as " bol", "ts" although " bolt" is a token) the reference and a correct
  projection part: the chain rule, exact and free of tokenizer rules, checks the landing.

A paired special in the support (the student's EOS) is scored as "r, then the teacher's
twin token". Teacher rows come from `ModelRows` (a Hugging Face model: one pass over the
teacher sequence, then batched branch passes on its KV cache) or `BigramRows` (the
stand-in teachers of tests/tokenizers.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from teacher_server.alignment.session import Coverage

PRUNE = 1e-6  # teacher paths and texts less probable than this (from b) are not followed
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
        states = {}
        with torch.inference_mode():
            todo = [context for context in dict.fromkeys(contexts) if context[1]]
            while todo:
                chunk = [todo.pop()]
                width = len(chunk[0][1])
                while todo and width + len(todo[-1][1]) <= BRANCH_CHUNK:
                    chunk.append(todo.pop())
                    width += len(chunk[-1][1])
                states.update(self._branches(chunk, width))
            hidden = torch.stack([states[c] if c[1] else self.hidden[c[0] - 1] for c in contexts])
            out = []
            for start in range(0, len(contexts), BRANCH_CHUNK):
                logits = self.engine.lm_head(hidden[start : start + BRANCH_CHUNK]).double()
                out += list(torch.log_softmax(logits, -1).float().numpy())
            return out

    def _branches(self, chunk, width: int) -> dict:
        torch, length, engine = self.torch, self.length, self.engine
        ids = torch.zeros((1, width), dtype=torch.long)
        positions = torch.zeros((1, width), dtype=torch.long)
        allowed = torch.zeros((1, 1, width, length + width), dtype=torch.bool)
        start, ends = 0, {}
        for at, extra in chunk:
            n = len(extra)
            ids[0, start : start + n] = torch.tensor(extra)
            positions[0, start : start + n] = at + torch.arange(n)
            allowed[0, 0, start : start + n, :at] = True
            allowed[0, 0, start : start + n, length + start : length + start + n] = torch.ones(n, n).tril().bool()
            ends[(at, extra)] = start + n - 1
            start += n
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        out = engine.backbone(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                              **{engine._cache_argument: self.cache}).last_hidden_state[0]  # fmt: skip
        self.cache.crop(-width)  # the branch tokens go: the teacher sequence stays as it was
        return {key: out[end] for key, end in ends.items()}


class BigramRows:
    """Rows of a BigramTeacher (tests/tokenizers.py): they depend on the last token only."""

    def __init__(self, engine, teacher_ids: np.ndarray) -> None:
        self.engine, self.teacher_ids = engine, teacher_ids

    def rows(self, contexts: list[tuple[int, tuple[int, ...]]]) -> list[np.ndarray]:
        return [self.engine.distribution(int(extra[-1] if extra else self.teacher_ids[at - 1])) for at, extra in contexts]


class TeacherVocabulary:
    """The teacher tokens the brute force may write (every token with bytes the server offers),
    sorted by their bytes, so that the tokens beginning with given bytes are one slice."""

    def __init__(self, table, excluded: np.ndarray) -> None:
        self.vocab_size = table.vocab_size
        allowed = table.lengths > 0
        allowed[excluded[excluded < len(allowed)]] = False
        ordered = sorted((table.tokens[i], i) for i in np.flatnonzero(allowed).tolist())
        self.keys = [token for token, _ in ordered]
        self.ids = np.asarray([i for _, i in ordered], dtype=np.int64)
        self.by_bytes: dict[bytes, list[int]] = {}
        for token, i in ordered:
            self.by_bytes.setdefault(token, []).append(i)

        self.rank = dict(zip(self.ids.tolist(), range(len(self.ids))))

    def slice_of(self, prefix: bytes) -> tuple[int, int]:
        lo = bisect.bisect_left(self.keys, prefix)
        return lo, bisect.bisect_left(self.keys, prefix + b"\xff" * 64, lo)

    def probability(self, cumulative: np.ndarray, token: int) -> float:
        at = self.rank[token]
        return float(cumulative[at + 1]) - float(cumulative[at])

    def prefixes_of(self, rest: bytes, proper: bool) -> list[tuple[int, bytes]]:
        """(token, bytes left) for every token that is a prefix of `rest` (a proper one if `proper`)."""
        stop = len(rest) if proper else len(rest) + 1
        return [(t, rest[cut:]) for cut in range(1, stop) for t in self.by_bytes.get(rest[:cut], [])]


class RowStore:
    """Teacher rows of one text, computed in batches: a row not yet computed reads as all zero and is
    remembered; `fill` computes the remembered ones in one call. Brute-force figures are recomputed
    until no row is missing (as many rounds as the deepest teacher path). A row is kept as its
    cumulative probabilities in the vocabulary's byte order (float32: a token's probability is a
    difference of two of them) and the probabilities of `twins`, the teacher's paired specials."""

    def __init__(self, rows, vocabulary: "TeacherVocabulary", twins: list[int]) -> None:
        self.rows, self.vocabulary, self.twins = rows, vocabulary, twins
        self.known: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, dict[int, float]]] = {}
        self.missing: set[tuple[int, tuple[int, ...]]] = set()
        self.blank = np.zeros(len(vocabulary.ids) + 1, np.float32), dict.fromkeys(twins, 0.0)

    def get(self, at: int, path: tuple[int, ...]) -> tuple[np.ndarray, dict[int, float]]:
        found = self.known.get((at, path))
        if found is None:
            self.missing.add((at, path))
            return self.blank
        return found

    def fill(self) -> bool:
        """Compute the missing rows; False when none was missing."""
        if not self.missing:
            return False
        contexts = sorted(self.missing)
        for start in range(0, len(contexts), 1024):
            chunk = contexts[start : start + 1024]
            for context, logp in zip(chunk, self.rows.rows(chunk)):
                probabilities = np.exp(logp[self.vocabulary.ids].astype(np.float64))
                cumulative = np.concatenate([[0.0], np.cumsum(probabilities)]).astype(np.float32)
                self.known[context] = cumulative, {t: float(np.exp(logp[t])) for t in self.twins}
        self.missing.clear()
        return True


class BruteForce:
    """Teacher probabilities of texts after one teacher boundary (teacher_ids[:at]), full vocabulary."""

    def __init__(self, store: RowStore, at: int) -> None:
        self.store, self.vocabulary, self.at = store, store.vocabulary, at
        self._marginals: dict[bytes, float] = {}

    def _row(self, path: tuple[int, ...]) -> tuple[np.ndarray, dict[int, float]]:
        return self.store.get(self.at, path)

    def _step(self, cumulative: np.ndarray, token: int, logp: float) -> float:
        """log P(path + token) from log P(path); -inf for an impossible token."""
        prob = self.vocabulary.probability(cumulative, token)
        return logp + np.log(prob) if prob > 0 else -np.inf

    def marginal(self, text: bytes) -> float:
        """P(the teacher's text begins with `text`), summed over its token paths."""
        if text not in self._marginals:
            self._marginals[text] = self._paths(text, twin=-1)
        return self._marginals[text]

    def first_token_mass(self, trie, r: bytes, token_bytes: bytes, node: int) -> float:
        """P(the text after r begins with the student token at `node` and with no longer one)."""
        return max(self.marginal(r + token_bytes) - self._matched_below(trie, node, r + token_bytes), 0.0)

    def _matched_below(self, trie, node: int, text: bytes) -> float:
        """P(the text begins with `text` and a longer student token)."""
        if not trie.has_longer[node]:
            return 0.0
        lo, hi = np.searchsorted(trie.keys, [node * 256, node * 256 + 256])
        total = 0.0
        for key, child in zip(trie.keys[lo:hi].tolist(), trie.children[lo:hi].tolist()):
            longer = text + bytes([key % 256])
            mass = self.marginal(longer)
            if mass >= PRUNE:
                total += mass if trie.token_at[child] >= 0 else self._matched_below(trie, child, longer)
        return total

    def exactly_then(self, text: bytes, twin: int) -> float:
        """P(the teacher writes exactly `text`, then the token `twin`)."""
        return self._paths(text, twin)

    def _paths(self, text: bytes, twin: int) -> float:
        total, states = 0.0, [((), text, 0.0)]
        while states:
            following = []
            for path, rest, logp in states:
                cumulative, twins = self._row(path)
                if twin >= 0 and not rest:
                    total += np.exp(logp) * twins[twin]
                    continue
                if twin < 0:
                    lo, hi = self.vocabulary.slice_of(rest)
                    total += np.exp(logp) * float(cumulative[hi] - cumulative[lo])
                for token, left in self.vocabulary.prefixes_of(rest, proper=twin < 0):
                    step = self._step(cumulative, token, logp)
                    if step > np.log(PRUNE):
                        following.append((path + (token,), left, step))
            states = following
        return total


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
    kind: list = field(default_factory=list)
    positions: int = 0
    coverage: Coverage = field(default_factory=Coverage)  # the responses' own counts, summed

    def summary(self) -> dict:
        chain, tv, kind = np.asarray(self.chain_diff), np.asarray(self.tv), np.asarray(self.kind, dtype=np.int64)
        out = {"positions": self.positions, "coverage": self.coverage.coverage, "retained_mass": self.coverage.mean_retained_mass,
               "boundary_positions": len(chain), "boundary_masked": self.boundary_masked}
        if len(chain):
            out |= {"chain_mean": float(chain.mean()), "chain_p99": float(np.quantile(chain, 0.99)),
                    "chain_share_over_0.05": float((chain > 0.05).mean()), "chain_max": float(chain.max())}  # fmt: skip
            excess = np.asarray(self.entry_excess)
            out |= {"entry_excess_mean": float(excess.mean()), "entry_share_over_0.05": float((np.abs(excess) > 0.05).mean())}
        if len(tv):
            out |= {"tv_positions": len(tv), "tv_mean": float(tv.mean()), "tv_p99": float(np.quantile(tv, 0.99)),
                    "covered_mean": float(np.mean(self.covered))}  # fmt: skip
            for index, name in enumerate(KINDS):
                chosen = kind == index
                if chosen.any():
                    out[f"tv_{name}"] = (int(chosen.sum()), float(tv[chosen].mean()), float(np.quantile(tv[chosen], 0.99)))
        return out


def measure(cross, engine, rows_of, tokenizer, examples, top_k: int = 32, tv_positions: int = 500,
            chat: bool = True) -> Fidelity:  # fmt: skip
    """Score each GSM8K example (question as the prompt, answer as the completion) and compare:
    the chain rule at every boundary position of every example, brute force at every position of
    the first examples until `tv_positions` are compared."""
    vocabulary = TeacherVocabulary(cross.text.table, cross.excluded)
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
        found.coverage.add(result.coverage)
        _chain_rule(found, plan, result, rows)
        if len(found.tv) < tv_positions:
            _brute_force(found, cross, plan, result, rows, vocabulary)
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
    # text by other tokens, so never below it; far above it means other text landed on the target.
    entry = result.ids[chosen] == plan.targets[chosen, None]
    listed = entry.any(axis=1)
    logp = result.logprobs[chosen][entry].astype(np.float64)
    found.entry_excess += (logp - reference[listed]).tolist()


def _brute_force(found: Fidelity, cross, plan, result, rows, vocabulary: TeacherVocabulary) -> None:
    student, specials, trie = cross.student, cross.specials, cross.tables.trie
    twin_of = {s: t for t, s in specials.teacher_to_student.items()}
    kinds = position_kinds(plan)
    store = RowStore(rows, vocabulary, sorted(twin_of.values()))
    chosen = np.flatnonzero(result.mask == 1).tolist()
    while True:
        figures = []
        for p in chosen:
            ids = result.ids[p][result.ids[p] >= 0].tolist()
            r = plan.units[plan.s[p] - plan.rho[p] : plan.s[p]].astype(np.uint8).tobytes()
            brute = BruteForce(store, plan.teacher_from + int(plan.row[p]))
            reference = np.asarray([
                brute.exactly_then(r, twin_of[v]) if v in twin_of
                else 0.0 if student.special[v]
                else brute.first_token_mass(trie, r, student.tokens[v], trie.prefix_nodes[trie.token_starts[v] + student.lengths[v]])
                for v in ids
            ])  # fmt: skip
            total = brute.marginal(r) if r else 1.0
            figures.append((p, ids, reference, total))
        if not store.fill():
            break
    for p, ids, reference, total in figures:
        if reference.sum() <= 0:
            continue
        projected = np.exp(result.logprobs[p][: len(ids)].astype(np.float64))
        found.tv.append(0.5 * np.abs(projected / projected.sum() - reference / reference.sum()).sum())
        found.covered.append(min(reference.sum() / max(total, 1e-300), 1.0))
        found.kind.append(int(kinds[p]))
