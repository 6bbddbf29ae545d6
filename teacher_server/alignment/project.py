"""Projection of the teacher's candidates onto the student's vocabulary (DESIGN.md section 6.4-6.6).

For a student position whose prefix ends at unit s, the teacher's candidates are
read at the last teacher boundary b <= s (r = the units between b and s). A
candidate is a teacher *path* from b: it must begin with r; what it writes after
r decides the student token it lands on, and its probability (the chain rule
along the path) adds to that token's. Paths are followed as far as needed:

* a path whose text is the rollout's text through the end of the student's actual
  target lands on it. When the rollout's own teacher tokens end exactly with the
  target, the teacher's next token (the rollout's next row, free) decides first: a
  token that goes on with the target's last word is other text (" restart" + "s" is
  " restarts", which a SentencePiece student writes " rest", "arts"), landing on the
  first token of the student's encoding of the joined bytes (pair.first_after). The
  rollout's own next token is such text too where the student's tokenizer would not
  begin the rollout's own word with the target (a sampled "0", "0" for "00"): what was
  sampled at a position does not change the distribution there;
* a path that leaves the rollout's text, before or after covering the target, is
  other text (" three" is not the student's lone " " before "3"): unless it is
  *ambiguous* (pair.py: the teacher may be spelling a longer student token one
  teacher token at a time, "1" -> "130"), it lands where the student's tokenizer
  starts on its bytes after r. For a path of one teacher token from a boundary that
  is the first token of the student's own encoding of that token's text
  (pair.first_student_tokens: SentencePiece writes " ducks" as " d", "ucks"); for
  longer paths and inside a teacher token, the longest student token its bytes
  begin with;
* a path still short of its landing (inside r, inside the actual target, or
  ambiguous) continues with the teacher's next token. Along the rollout's own
  teacher tokens that distribution is already scored (free); elsewhere it needs a
  branch (engines/base.py), scored in bounded extra rounds (session.py). A path
  still open when the rounds are spent lands on its longest student token so far (a
  guess: "1" may be on its way to "13"), and a position where such paths are most of
  the mass is LOW_MASS.

The remaining approximation: the student's first token is read from the text the path
has written (plus one teacher token after the target on the rollout's own path), while
BPE merges and pre-tokenizer look-aheads can depend on text after it: the teacher's
" cheese" lands where the student starts on " cheese", though the teacher may go on
with "cake"; another teacher path that ends with the target (" restart" when the
rollout's teacher token is " restarting") lands on it without reading on.

At a position whose target starts and ends on teacher boundaries, `finish` gives the
target the chain rule over the rollout's teacher tokens (DESIGN.md 6.5); other paths
that write the same text (" rest" + "art" for " restart") add to its support entry only,
and the teacher's words that go on past it leave it.

Everything is vectorised over all (path, candidate) pairs of a request. Log
masses are kept per landing; `finish` sums them per (position, student token).
At a boundary (r empty) a token's value is its summed teacher probability,
normalised over the teacher's full vocabulary; inside a teacher token it is
conditioned on r (divided by the mass of the paths consistent with r).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from opd.v1 import teacher_pb2
from teacher_server.alignment.align import Alignment
from teacher_server.alignment.byte_tables import WINDOW
from teacher_server.alignment.pair import BYTE_CLASS, PairTables, path_hash
from teacher_server.alignment.specials import SpecialMap

LOW_MASS = teacher_pb2.MASK_REASON_LOW_MASS
MAX_EXTRA = 8  # off-rollout tokens a path may carry into a branch
MIN_LOOKAHEAD_PROB = 1e-4  # see Projection._land_after_target
MAX_WORD_UNITS = 64  # see Projection._tokenizer_writes_target_first
MAX_UNRESOLVED_SHARE = 0.5  # see Projection.finish
UNALIGNED = teacher_pb2.MASK_REASON_UNALIGNED


@dataclass
class Paths:
    """Open teacher paths (struct of arrays), one per (position, path)."""

    pos: np.ndarray  # int64: scored position p
    logp: np.ndarray  # float64: log-probability of the path
    blen: np.ndarray  # int64: units the path covers from its boundary
    follows: np.ndarray  # bool: the path's units equal the rollout's so far
    node: np.ndarray  # int64: student trie node of the units after r (-1: fell off / none yet)
    best: np.ndarray  # int64: longest student token the units after r begin with (-1 none)
    main_row: np.ndarray  # int64: next completion teacher row when the path is the rollout's own, else -1
    attach: np.ndarray  # int64: global teacher index the off-rollout part follows (-1 on the rollout)
    extra: np.ndarray  # int64 [n, MAX_EXTRA]: off-rollout teacher tokens, -1 padded
    extra_len: np.ndarray  # int64: how many; MAX_EXTRA + 1 = too long to branch
    hash: np.ndarray  # uint64: path_hash of all its tokens

    @staticmethod
    def empty() -> "Paths":
        z = np.zeros(0, dtype=np.int64)
        return Paths(
            pos=z,
            logp=np.zeros(0),
            blen=z,
            follows=np.zeros(0, bool),
            node=z,
            best=z,
            main_row=z,
            attach=z,
            extra=np.zeros((0, MAX_EXTRA), np.int64),
            extra_len=z,
            hash=np.zeros(0, np.uint64),
        )

    def __len__(self) -> int:
        return len(self.pos)

    def take(self, index: np.ndarray) -> "Paths":
        return Paths(*(getattr(self, key.name)[index] for key in fields(Paths)))

    @staticmethod
    def concat(parts: list["Paths"]) -> "Paths":
        parts = [part for part in parts if len(part)]
        if not parts:
            return Paths.empty()
        return Paths(*(np.concatenate([getattr(p, key.name) for p in parts]) for key in fields(Paths)))


@dataclass
class ProjectionStats:
    branch_sequences: int = 0
    branch_tokens: int = 0
    unresolved_paths: int = 0  # paths still open when the rounds were spent (landed on their longest token)


@dataclass
class Projection:
    """The projection of one request in progress."""

    alignment: Alignment
    tables: PairTables
    specials: SpecialMap
    main_ids: np.ndarray  # int64 [Mc, C + 1]: candidates at each completion teacher row (-1 pad)
    main_logp: np.ndarray  # float64 [Mc, C + 1]
    main_token_logp: np.ndarray  # float64 [Mc]: log-probability of the rollout's own teacher token
    unseen: np.ndarray  # float64 [Mc]: teacher mass outside all the candidates the engine returned
    open: Paths = field(default_factory=Paths.empty)
    landed_pos: list = field(default_factory=list)
    landed_id: list = field(default_factory=list)
    landed_logp: list = field(default_factory=list)
    stats: ProjectionStats = field(default_factory=ProjectionStats)

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        alignment: Alignment,
        tables: PairTables,
        specials: SpecialMap,
        ids,
        logprobs,
        token_logprobs,
        candidates: int | None = None,
    ) -> "Projection":
        """Project the rows of the rollout's own teacher sequence; rows are completion teacher tokens.

        `candidates`: the columns of `ids` read at a teacher boundary (None: all). A position
        inside a teacher token reads every column at that token's start: only the candidates that
        begin with the partial bytes r count there, a small share of any top C. Later steps of its
        paths (rollout rows, branches) read `candidates` again.
        """
        a = alignment
        actual = a.teacher_ids[a.teacher_from :].astype(np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        logprobs = np.asarray(logprobs, np.float64)
        token_logprobs = np.asarray(token_logprobs, np.float64)
        wide_ids, wide_logp = _with_actual_token(ids, logprobs, actual, token_logprobs)
        narrow = ids.shape[1] if candidates is None else min(candidates, ids.shape[1])
        main_ids, main_logp = _with_actual_token(ids[:, :narrow], logprobs[:, :narrow], actual, token_logprobs)
        unseen = np.clip(1.0 - np.exp(logprobs).sum(axis=1), 0.0, 1.0)
        projection = cls(a, tables, specials, main_ids, main_logp, token_logprobs, unseen)
        todo = np.flatnonzero(a.reason == 0)
        n = len(todo)
        zeros = np.zeros(n, dtype=np.int64)
        roots = Paths(
            pos=todo,
            logp=np.zeros(n),
            blen=zeros.copy(),
            follows=np.ones(n, bool),
            node=zeros - 1,
            best=zeros - 1,
            main_row=a.row[todo],
            attach=zeros - 1,
            extra=np.full((n, MAX_EXTRA), -1, np.int64),
            extra_len=zeros.copy(),
            hash=np.zeros(n, np.uint64),
        )
        inside = a.rho[todo] > 0
        projection._follow_rollout(roots.take(np.flatnonzero(~inside)), main_ids, main_logp)
        projection._follow_rollout(roots.take(np.flatnonzero(inside)), wide_ids, wide_logp)
        return projection

    def _follow_rollout(self, paths: Paths, first_ids: np.ndarray, first_logp: np.ndarray) -> None:
        """Extend paths along the rollout's own teacher rows until none is left on it; the first step
        reads the rows `first_ids`/`first_logp`, later ones main_ids/main_logp."""
        ids, logp = first_ids, first_logp
        while len(paths):
            children = self._extend(paths, ids[paths.main_row], logp[paths.main_row])
            ids, logp = self.main_ids, self.main_logp
            on_rollout = children.main_row >= 0
            self.open = Paths.concat([self.open, children.take(np.flatnonzero(~on_rollout))])
            paths = children.take(np.flatnonzero(on_rollout))

    # ------------------------------------------------------------------ branches

    def branch_requests(
        self, min_prob: float, budget_tokens: int, max_open_mass: float
    ) -> list[tuple[int, tuple[int, ...]]]:
        """The off-rollout paths worth a branch: (attach, tokens), most probable first, within budget.

        A path is worth one at probability >= min_prob, and down to min_prob / 10 while it and the
        less probable open paths of its position hold more than max_open_mass: a number after "="
        is spread over many digits, each path small and together most of the mass, which would
        otherwise land on guesses (finish)."""
        paths = self.open
        worth = (paths.extra_len <= MAX_EXTRA) & (paths.attach >= 1) & (paths.logp >= np.log(min_prob / 10))
        worth &= (paths.logp >= np.log(min_prob)) | (self._open_mass_from(paths) > max_open_mass)
        worth = np.flatnonzero(worth)
        if not len(worth):
            return []
        worth = worth[np.argsort(-paths.logp[worth], kind="stable")]
        keys = np.column_stack([paths.attach[worth], paths.extra[worth]])
        _, first = np.unique(keys, axis=0, return_index=True)
        first = np.sort(first)  # distinct branches, most probable path first
        spent = np.cumsum(paths.extra_len[worth[first]])
        first = first[spent <= budget_tokens]
        return [
            (int(keys[i, 0]), tuple(int(t) for t in keys[i, 1 : 1 + paths.extra_len[worth[i]]])) for i in first.tolist()
        ]

    @staticmethod
    def _open_mass_from(paths: Paths) -> np.ndarray:
        """Per path: the probability of it and of the less probable open paths at its position."""
        order = np.lexsort((paths.logp, paths.pos))  # per position, least probable first
        prob = np.exp(paths.logp[order])
        running = np.cumsum(prob)
        start = np.searchsorted(paths.pos[order], paths.pos[order], side="left")
        before = np.where(start > 0, running[np.maximum(start - 1, 0)], 0.0)
        mass = np.empty(len(paths))
        mass[order] = running - before
        return mass

    def absorb(self, requests: list[tuple[int, tuple[int, ...]]], ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Extend the open paths whose branch was scored; ids/logprobs: the row after each branch."""
        self.stats.branch_sequences += len(requests)
        self.stats.branch_tokens += sum(len(tokens) for _, tokens in requests)
        asked = np.full((len(requests), 1 + MAX_EXTRA), -1, dtype=np.int64)
        for i, (at, extra) in enumerate(requests):
            asked[i, 0] = at
            asked[i, 1 : 1 + len(extra)] = extra
        mine = np.column_stack([self.open.attach, self.open.extra])
        # The request each open path matches, if any: the few requests sorted, the many open
        # paths looked up in them (sorting them all, as np.unique(axis=0) did, took 5-10x longer).
        asked_rows, mine_rows = _row_view(asked), _row_view(mine)
        order = np.argsort(asked_rows)
        at = np.minimum(np.searchsorted(asked_rows[order], mine_rows), len(order) - 1)
        slot = np.where(asked_rows[order][at] == mine_rows, order[at], -1)
        scored = np.flatnonzero(slot >= 0)
        paths = self.open.take(scored)
        self.open = self.open.take(np.flatnonzero(slot < 0))
        children = self._extend(
            paths, np.asarray(ids, np.int64)[slot[scored]], np.asarray(logprobs, np.float64)[slot[scored]]
        )
        self.open = Paths.concat([self.open, children])

    # ------------------------------------------------------------------ one step

    def _extend(self, paths: Paths, cand: np.ndarray, cand_logp: np.ndarray) -> Paths:
        """Every path followed by each of its candidates: land what can land, return the rest."""
        a, t = self.alignment, self.tables
        teacher, trie = t.teacher, t.trie
        count, width = cand.shape
        flat = np.repeat(np.arange(count), width)
        c = cand.reshape(-1)
        keep = c >= 0
        flat, c, lp = flat[keep], c[keep], (np.repeat(paths.logp, width) + cand_logp.reshape(-1))[keep]
        pos = paths.pos[flat]
        blen = paths.blen[flat]
        follows = paths.follows[flat]
        rho = a.rho[pos]
        y = a.targets[pos]
        ylen = a.e[pos] - a.s[pos]
        boundary = a.t_start[a.row[pos]]
        length = teacher.lengths[c]
        new_blen = blen + length

        # Paired special candidates: only right at the student's boundary.
        twin = np.full(len(c), -1, dtype=np.int64)
        for teacher_id, student_id in self.specials.teacher_to_student.items():
            twin[c == teacher_id] = student_id
        is_twin = twin >= 0
        at_boundary = is_twin & (blen == rho)
        self._land(pos[at_boundary], twin[at_boundary], lp[at_boundary])
        # After some text of its own, a special token ends it: the path lands on that text's token.
        ends_text = is_twin & (blen > rho) & (paths.best[flat] >= 0)
        self._land(pos[ends_text], paths.best[flat][ends_text], lp[ends_text])
        text = ~is_twin & (length > 0)

        # How far each candidate agrees with the rollout's units from where it starts.
        agree = np.zeros(len(c), dtype=np.int64)
        check = np.flatnonzero(text & follows)
        if len(check):
            agree[check] = self._common_prefix(c[check], boundary[check] + blen[check])
        need_r = np.maximum(rho - blen, 0)
        consistent = text & (~follows | (agree >= np.minimum(length, need_r)))
        short = consistent & follows & (new_blen <= rho)
        past_r = consistent & ~short
        covered = blen + agree - rho  # units after r the path has written on the rollout's text
        on_text = past_r & follows & (agree == length)  # the whole token is the rollout's text
        hit = on_text & (covered >= ylen)
        # A path that ends with the target along the rollout's own teacher tokens: the next row says
        # whether the teacher's text goes on past it (free: it is the rollout's next row).
        row = paths.main_row[flat]
        own = (row >= 0) & (c == a.teacher_ids[a.teacher_from + np.maximum(row, 0)])
        ends = np.flatnonzero(hit & (covered == ylen) & own & (row + 1 < len(a.t_start)))
        hit[ends] = False
        self._land(pos[hit], y[hit], lp[hit])
        self._land_after_target(pos[ends], y[ends], lp[ends], row[ends] + 1)
        along = on_text & (covered < ylen)  # still inside the target, on its text
        diverged = past_r & ~on_text

        # Diverged: walk the student trie over the path's own bytes after r. Up to where it leaves
        # the rollout's text those are the target's bytes (then the text after the target), so
        # the walk starts at the target's prefix node and reads the rest from the candidate.
        d = np.flatnonzero(diverged)
        prior_follow = follows[d]
        # Depth into the target's own bytes (a special paired with teacher text has none in the
        # student's table: its diverging alternatives are walked from the root, an approximation).
        y_bytes = t.student.lengths[np.maximum(y, 0)]
        m = np.where(prior_follow, np.minimum(covered[d], y_bytes[d]), 0)
        y_base = trie.token_starts[np.maximum(y[d], 0)]
        start_node = np.where(prior_follow, trie.prefix_nodes[y_base + np.maximum(m, 0)], paths.node[flat[d]])
        start_best = np.where(
            prior_follow, np.where(m > 0, t.prefix_best[y_base + np.maximum(m, 0)], -1), paths.best[flat[d]]
        )
        skip = np.where(prior_follow, np.maximum(agree[d] - np.maximum(covered[d] - m, 0), 0), 0)
        node, found, _depth = trie.walk(
            start_node, teacher.data, teacher.starts[c[d]] + skip, teacher.starts[c[d]] + length[d]
        )
        best = np.where(found >= 0, found, start_best)
        # A path that is one teacher token from the boundary lands where the student's tokenizer
        # starts on that token's text (pair.py); deeper paths take the longest match.
        whole = (blen[d] == 0) & (rho[d] == 0) & (t.first_student[c[d]] >= 0)
        best[whole] = t.first_student[c[d][whole]]
        hashes = path_hash(paths.hash[flat[d]], c[d])
        open_end = (node >= 0) & trie.has_longer[np.maximum(node, 0)]
        ambiguous = open_end & (rho[d] == 0) & t.is_ambiguous(hashes)
        lands = ~ambiguous & (best >= 0)
        self._land(pos[d][lands], best[lands], lp[d][lands])

        # What continues: short paths, paths along the target, ambiguous diverged ones.
        stay = np.flatnonzero(short | along)
        depth = np.clip(covered[stay], 0, y_bytes[stay])
        prefix = trie.token_starts[np.maximum(y[stay], 0)] + depth
        cont = np.concatenate([stay, d[ambiguous]])
        cont_node = np.concatenate([np.where(short[stay], -1, trie.prefix_nodes[prefix]), node[ambiguous]])
        cont_best = np.concatenate([np.where(short[stay] | (depth == 0), -1, t.prefix_best[prefix]), best[ambiguous]])
        cont_follows = np.concatenate([np.ones(len(stay), bool), np.zeros(int(ambiguous.sum()), bool)])
        parent = flat[cont]
        parent_row = row[cont]
        on_rollout = own[cont]
        next_row = np.where(on_rollout & (parent_row + 1 < len(a.t_start)), parent_row + 1, -1)
        # A path leaving the rollout attaches after the rollout's tokens it shares.
        attach = np.where(parent_row >= 0, a.teacher_from + np.maximum(parent_row, 0), paths.attach[parent])
        # Off-rollout tokens: none on the rollout; the token itself when leaving it; else appended.
        off = next_row < 0
        leaving = off & (parent_row >= 0)
        extra = np.full((len(cont), MAX_EXTRA), -1, dtype=np.int64)
        extra_len = np.zeros(len(cont), dtype=np.int64)
        extra[leaving, 0] = c[cont][leaving]
        extra_len[leaving] = 1
        deeper = np.flatnonzero(off & (parent_row < 0))
        extra[deeper] = paths.extra[parent[deeper]]
        room = paths.extra_len[parent[deeper]] < MAX_EXTRA
        extra[deeper[room], paths.extra_len[parent[deeper[room]]]] = c[cont][deeper[room]]
        extra_len[deeper] = np.where(room, paths.extra_len[parent[deeper]] + 1, MAX_EXTRA + 1)
        attach = np.where(off, attach, -1)
        # A rollout path that reached the end of the teacher sequence continues as a branch after it.
        return Paths(
            pos=pos[cont],
            logp=lp[cont],
            blen=new_blen[cont],
            follows=cont_follows,
            node=cont_node,
            best=cont_best,
            main_row=next_row,
            attach=attach,
            extra=extra,
            extra_len=extra_len,
            hash=path_hash(paths.hash[parent], c[cont]),
        )

    def _land_after_target(self, pos: np.ndarray, y: np.ndarray, logp: np.ndarray, row: np.ndarray) -> None:
        """Land paths that wrote the rollout's text up to the end of the target y, split by the
        teacher's next token (completion row `row`): a token that begins a new word, and the unread
        rest, keep the target; a token that continues the target's last word is other text, landing
        where the student's tokenizer starts on the joined bytes (SentencePiece writes " restarts"
        as " rest", "arts"; Tekken writes ".\n" + "\n" as ".\n\n"). So is the rollout's own next
        token where the student's tokenizer would not begin the rollout's own word with y: a
        sampled split ("0", "0" where it writes "00") is not evidence of where the text's mass
        belongs, and a position's distribution must not depend on the token sampled there.
        Continuations below MIN_LOOKAHEAD_PROB stay on the target."""
        a, t = self.alignment, self.tables
        ids, row_logp = self.main_ids[row], self.main_logp[row]
        weight = logp[:, None] + row_logp
        candidate = (ids >= 0) & (weight >= np.log(MIN_LOOKAHEAD_PROB))
        candidate[candidate] = t.continues_word(np.broadcast_to(y[:, None], ids.shape)[candidate], ids[candidate])
        path, column = np.nonzero(candidate)
        first = t.first_after(y[path], ids[path, column])
        moves = (first >= 0) & (first != y[path])
        own = np.flatnonzero(moves & (ids[path, column] == a.teacher_ids[a.teacher_from + row[path]]))
        moves[own] = ~self._tokenizer_writes_target_first(pos[path[own]], y[path[own]])
        path, column, first = path[moves], column[moves], first[moves]
        self._land(pos[path], first, weight[path, column])
        moved = np.bincount(path, weights=np.exp(row_logp[path, column]), minlength=len(pos))
        self._land(pos, y, logp + np.log(np.clip(1.0 - moved, 1e-300, 1.0)))

    def _tokenizer_writes_target_first(self, pos: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether the student's tokenizer begins the rollout's own bytes from each position, through
        the end of the word its target runs into (one byte class, at most MAX_WORD_UNITS), with the
        target y; also where that cannot be told (a special token in the way, an unknown split)."""
        a = self.alignment
        words, told = [], []
        for index, p in enumerate(pos.tolist()):
            start, end = int(a.s[p]), int(a.e[p])
            after = a.units[end : min(end + MAX_WORD_UNITS, a.num_units)]
            classes = BYTE_CLASS[np.minimum(after, 255)]
            other = np.flatnonzero((after >= 256) | (classes != classes[:1]))
            word = a.units[start : end + (int(other[0]) if len(other) else len(after))]
            if len(word) and len(after) and (word < 256).all():
                words.append(word.astype(np.uint8).tobytes())
                told.append(index)
        writes = np.ones(len(pos), dtype=bool)
        if words:
            first = self.tables.first_of_words(words)
            writes[told] = (first < 0) | (first == y[told])
        return writes

    def _common_prefix(self, cand: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Units shared by each teacher token and the stream from `at` (capped at the token length)."""
        teacher = self.tables.teacher
        units = self.alignment.units
        length = teacher.lengths[cand]
        agree = np.zeros(len(cand), dtype=np.int64)
        todo = np.arange(len(cand))
        done = 0
        # Most candidates part from the text within a few bytes: compare 4 units first, then the
        # whole window for those still equal, then (rare) longer tokens exactly.
        for width in (4, WINDOW):
            if not len(todo):
                break
            columns = np.arange(done, width)
            index = np.minimum(at[todo, None] + columns, len(units) - 1)
            equal = teacher.padded[cand[todo, None], columns] == units[index]
            same = equal.all(axis=1)
            agree[todo] = np.where(same, width, done + np.argmin(equal, axis=1))
            todo = todo[same & (length[todo] > width)]
            done = width
        for i in todo.tolist():  # tokens longer than the window, equal so far
            token = teacher.tokens[cand[i]]
            stream = units[at[i] : at[i] + len(token)]
            same = np.frombuffer(token, dtype=np.uint8)[: len(stream)] == stream
            agree[i] = len(stream) if same.all() else int(np.argmin(same))
        return np.minimum(agree, length)

    def _land(self, pos: np.ndarray, student: np.ndarray, logp: np.ndarray) -> None:
        if len(pos):
            self.landed_pos.append(pos)
            self.landed_id.append(student)
            self.landed_logp.append(logp)

    # ------------------------------------------------------------------ finish

    def _share_beginning_with_r(self, positions: np.ndarray) -> np.ndarray:
        """Fraction of the teacher's vocabulary whose bytes begin with each position's r."""
        a, trie = self.alignment, self.tables.teacher_trie
        starts = a.t_start[a.row[positions]]
        units = a.units.astype(np.int64)
        node, _, _ = trie.walk(np.zeros(len(positions), np.int64), units, starts, starts + a.rho[positions])
        return np.where(node >= 0, trie.below[np.maximum(node, 0)], 0) / max(self.tables.teacher.vocab_size, 1)

    def _chain_rule(self, positions: np.ndarray, total: np.ndarray) -> np.ndarray:
        """The rollout's teacher tokens covering each target: exact where the target starts and ends on
        teacher boundaries; elsewhere an estimate (conditioned on r inside a teacher token)."""
        a = self.alignment
        cumulative = np.concatenate([[0.0], np.cumsum(self.main_token_logp)])
        first = a.row[positions]
        last = np.minimum(np.searchsorted(a.t_end, a.e[positions], side="left"), len(a.t_end) - 1)
        value = cumulative[last + 1] - cumulative[first]
        conditioned = a.rho[positions] > 0
        value[conditioned] -= np.log(np.maximum(total[positions[conditioned]], 1e-300))
        return np.minimum(value, 0.0)

    def finish(self, top_k: int, min_consistent_mass: float = 0.0):
        """Sum per (position, student token), keep the top K; returns the response arrays and, per
        position, the log of the mass its values are conditioned on (0 at a teacher boundary)."""
        a = self.alignment
        # Paths still open when the branch rounds are spent have no landing we know ("1" on its way
        # to "130" may end as "1", "13" or "130"): they land on their longest student token so far,
        # an approximation the loss needs (left out, a sure teacher's support shrinks to the
        # target, and the student's mass elsewhere is never pushed down). Where they are most of
        # the mass, the position is LOW_MASS rather than a distribution that guess dominates.
        leftover = self.open
        self.stats.unresolved_paths += len(leftover)
        unresolved = np.bincount(leftover.pos, weights=np.exp(leftover.logp), minlength=a.num_positions)
        lands = leftover.best >= 0
        self._land(leftover.pos[lands], leftover.best[lands], leftover.logp[lands])
        self.open = Paths.empty()
        P = a.num_positions
        ids = np.full((P, top_k), -1, dtype=np.int32)
        logprobs = np.full((P, top_k), -np.inf, dtype=np.float32)
        token_logprobs = np.zeros(P, dtype=np.float32)
        reason = a.reason.copy()
        mass = np.zeros(P)
        total = np.zeros(P)
        if self.landed_pos:
            pos = np.concatenate(self.landed_pos)
            sid = np.concatenate(self.landed_id)
            prob = np.exp(np.concatenate(self.landed_logp))
            key = pos * (self.tables.student.vocab_size + 1) + sid
            unique, inverse = np.unique(key, return_inverse=True)
            summed = np.bincount(inverse, weights=prob)
            u_pos = unique // (self.tables.student.vocab_size + 1)
            u_sid = unique % (self.tables.student.vocab_size + 1)
            total = np.bincount(u_pos, weights=summed, minlength=P)
            # Inside a teacher token, condition on the partial bytes r.
            norm = np.where(a.rho[u_pos] > 0, total[u_pos], 1.0)
            value = summed / np.maximum(norm, 1e-300)
            order = np.lexsort((-value, u_pos))
            u_pos, u_sid, value = u_pos[order], u_sid[order], value[order]
            first = np.searchsorted(u_pos, u_pos, side="left")
            rank = np.arange(len(u_pos)) - first
            top = rank < top_k
            ids[u_pos[top], rank[top]] = u_sid[top]
            logprobs[u_pos[top], rank[top]] = np.log(value[top])
            np.add.at(mass, u_pos[top], value[top])
            actual = u_sid == a.targets[u_pos]
            token_logprobs[u_pos[actual]] = np.log(value[actual])
            has = np.zeros(P, dtype=bool)
            has[u_pos] = True
            # Where no path landed on the target, and wherever the target starts and ends on teacher
            # boundaries: the chain rule along the rollout's teacher tokens (DESIGN.md 6.5). Other
            # teacher paths that write the same text (" rest" + "art" for " restart") still add to
            # the target's support entry, but its token log-probability is the teacher's
            # probability of its own tokens.
            by_chain = has.copy()
            by_chain[u_pos[actual]] = False
            by_chain |= has & (a.rho == 0) & np.isin(a.e, a.t_end)
            token_logprobs[by_chain] = self._chain_rule(np.flatnonzero(by_chain), total)
        else:
            has = np.zeros(P, dtype=bool)
        todo = reason == 0
        reason[todo & ~has] = UNALIGNED
        if self.landed_pos:
            # Inside a teacher token the distribution is conditioned on r by the mass Z of the
            # paths consistent with r that were read. Teacher tokens outside the candidates
            # could begin with r too: spread the unread mass evenly over the vocabulary, the
            # share of tokens that begin with r estimates what Z misses. When that could
            # match Z itself, the condition rests on too little: LOW_MASS.
            inside = np.flatnonzero(todo & has & (a.rho > 0))
            missed = self.unseen[a.row[inside]] * self._share_beginning_with_r(inside)
            low = (total[inside] < missed) | (total[inside] < min_consistent_mass)
            reason[inside[low]] = LOW_MASS
            # Where most of the teacher's mass is on paths the rounds did not resolve (a number of
            # several digits after "=", each spelt one digit at a time): LOW_MASS.
            unresolved_share = unresolved / np.maximum(np.maximum(total, unresolved), 1e-300)
            reason[todo & has & (unresolved_share > MAX_UNRESOLVED_SHARE)] = LOW_MASS
        ids[reason != 0] = -1
        logprobs[reason != 0] = -np.inf
        token_logprobs[reason != 0] = 0.0
        conditioning = np.where(a.rho > 0, np.log(np.maximum(total, 1e-300)), 0.0)
        return ids, logprobs, token_logprobs, reason, mass, conditioning


def _with_actual_token(ids: np.ndarray, logp: np.ndarray, actual: np.ndarray, actual_logp: np.ndarray):
    """Candidates plus one column: the rollout's own teacher token where the row lacks it (else -1),
    with its exact log-probability, so that the chain rule along the rollout always exists."""
    seen = (ids == actual[:, None]).any(axis=1)
    return (
        np.concatenate([ids, np.where(seen, -1, actual)[:, None]], axis=1),
        np.concatenate([logp, actual_logp[:, None]], axis=1),
    )


def _row_view(rows: np.ndarray) -> np.ndarray:
    """Each row of a 2-D array as one opaque value, so that rows sort and compare as wholes."""
    rows = np.ascontiguousarray(rows)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
