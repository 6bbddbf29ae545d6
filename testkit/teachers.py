"""Stand-in teachers for alignment tests and benches, and cross-tokenizer sessions built from
the real tokenizers of testkit/tokenizers.py.

* ``BigramTeacher``: next-token probabilities from bigram counts over real texts, for every
  tokenizer of testkit/tokenizers.py; fast enough to score thousands of positions exactly.
* ``ScriptedTeacher``: probabilities written by a test for each text written after the prompt.
* ``smollm2_engine``: the real SmolLM2 teacher (testkit/real_model.py) in the HF engine.
"""

from __future__ import annotations

from functools import lru_cache

from testkit.tokenizers import load, table, teacher_text


class BigramTeacher:
    """An engine (engines/base.py) whose teacher is a smoothed bigram model of teacher tokens.

    It gives every teacher vocabulary a real, if weak, language model without weights:
    fitted on texts tokenized by the teacher's tokenizer, normalised over the full
    vocabulary, branches included. The coverage tests use it for tokenizer pairs whose
    teacher has no model here.
    """

    name = "bigram"
    dtype = "float64"
    temperatures = None
    supports_branches = True
    supports_requested_ids = False

    def __init__(self, tokenizer, texts, alpha: float = 2.0) -> None:
        import numpy as np

        self.vocab_size = len(tokenizer)
        self.model_name = f"bigram/{getattr(tokenizer, 'name_or_path', '')}"
        self.max_sequence_length = 1 << 20
        counts: dict[int, dict[int, int]] = {}
        unigram = np.ones(self.vocab_size)
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            for prev, nxt in zip(ids[:-1], ids[1:]):
                row = counts.setdefault(prev, {})
                row[nxt] = row.get(nxt, 0) + 1
            for token in ids:
                unigram[token] += 1
        self.counts = counts
        self.unigram = unigram / unigram.sum()
        self.alpha = alpha
        self._rows: dict[int, object] = {}
        self._tops: dict[tuple, object] = {}

    def distribution(self, prev: int):
        import numpy as np

        cached = self._rows.get(prev)
        if cached is None:
            row = self.counts.get(prev, {})
            total = sum(row.values())
            dist = self.alpha * self.unigram
            if row:
                ids = np.fromiter(row.keys(), dtype=np.int64)
                dist = dist.copy()
                dist[ids] += np.fromiter(row.values(), dtype=np.float64)
            cached = self._rows[prev] = np.log(dist / (total + self.alpha))
        return cached

    def _top(self, prev: int, job):
        import numpy as np

        key = (prev, job.top_k, len(job.exclude_ids), int(job.exclude_ids.sum()))
        cached = self._tops.get(key)
        if cached is None:
            dist = self.distribution(prev).copy()
            dist[job.exclude_ids[job.exclude_ids < self.vocab_size]] = -np.inf
            top = np.argpartition(-dist, job.top_k)[: job.top_k]
            top = top[np.argsort(-dist[top], kind="stable")]
            cached = self._tops[key] = (top, dist[top])
        return cached

    def score(self, jobs):
        import numpy as np

        from teacher_server.engines.base import TeacherScores

        results = []
        for job in jobs:

            def rows(contexts, targets):
                ids, lps, tlp = [], [], []
                for prev, target in zip(contexts, targets):
                    dist = self.distribution(int(prev))
                    tlp.append(dist[int(target)] if target >= 0 else 0.0)
                    top_ids, top_lps = self._top(int(prev), job)
                    ids.append(top_ids)
                    lps.append(top_lps)
                return (
                    np.asarray(ids, dtype=np.int32).reshape(-1, job.top_k),
                    np.asarray(lps, dtype=np.float32).reshape(-1, job.top_k),
                    np.asarray(tlp, dtype=np.float32),
                )

            tokens = job.token_ids
            ids, lps, tlp = rows(tokens[job.score_from - 1 : -1], tokens[job.score_from :])
            result = TeacherScores(ids=ids, logprobs=lps, token_logprobs=tlp)
            if job.branches:
                contexts, targets, before, before_targets = [], [], [], []
                for branch in job.branches:
                    contexts.append(branch.token_ids[-1])
                    targets.append(-1)
                    before += [tokens[branch.attach - 1], *branch.token_ids[:-1]]
                    before_targets += list(branch.token_ids)
                result.branch_ids, result.branch_logprobs, _ = rows(contexts, targets)
                result.branch_token_logprobs = rows(before, before_targets)[2]
            results.append(result)
        return results


# ----------------------------------------------------------------------------- alignment helpers


@lru_cache(maxsize=None)
def cross(student: str, teacher: str, engine, options=None, pairs=(), pair_eos: bool = True):
    """A CrossTokenizer for (student, teacher) as a session would build it."""
    from teacher_server.alignment.cross import CrossOptions, CrossTokenizer
    from teacher_server.alignment.specials import special_map

    s, t = load(student), load(teacher)
    specials = special_map(
        table(student).special_vocab, table(teacher).special_vocab, [s.eos_token], [t.eos_token_id], pairs, pair_eos
    )
    return CrossTokenizer.build(
        table(student),
        teacher_text(teacher),
        specials,
        engine.vocab_size,
        engine.max_sequence_length,
        options or CrossOptions(),
    )


class ScriptedTeacher:
    """An engine whose next-token probabilities are written by hand, for exact expectations.

    `script(context_bytes)` returns {teacher token id: probability} for the text after the
    prompt; whatever probability is left is spread evenly over the rest of the vocabulary.
    """

    name = "scripted"
    dtype = "float64"
    temperatures = None
    supports_branches = True
    supports_requested_ids = False
    max_sequence_length = 1 << 20

    def __init__(self, teacher_table, prompt_length_of, script) -> None:
        self.table = teacher_table
        self.vocab_size = teacher_table.vocab_size
        self.model_name = "scripted"
        self.prompt_length_of = prompt_length_of  # job -> index where the completion starts
        self.script = script

    def _row(self, context_bytes: bytes, exclude):
        import numpy as np

        chosen = {k: v for k, v in self.script(context_bytes).items() if v > 0}
        rest = max(1.0 - sum(chosen.values()), 0.0) / (self.vocab_size - len(chosen))
        dist = np.full(self.vocab_size, rest if rest > 0 else 1e-300)
        for token, prob in chosen.items():
            dist[token] = prob
        logp = np.log(dist)
        masked = logp.copy()
        masked[exclude[exclude < self.vocab_size]] = -np.inf
        return logp, masked

    def score(self, jobs):
        import numpy as np

        from teacher_server.engines.base import TeacherScores

        results = []
        for job in jobs:
            start = self.prompt_length_of(job)

            def rows(contexts, targets):
                ids, lps, tlp = [], [], []
                for context, target in zip(contexts, targets):
                    logp, masked = self._row(
                        self.table.token_bytes(np.asarray(context[start:], dtype=np.int64)), job.exclude_ids
                    )
                    top = np.argsort(-masked, kind="stable")[: job.top_k]
                    pad = job.top_k - len(top)  # K above a small vocabulary: padded as the engines do
                    ids.append(np.concatenate([top, np.full(pad, -1)]))
                    lps.append(np.concatenate([masked[top], np.full(pad, -np.inf)]))
                    tlp.append(logp[target] if target >= 0 else 0.0)
                return (
                    np.asarray(ids, np.int32).reshape(-1, job.top_k),
                    np.asarray(lps, np.float32).reshape(-1, job.top_k),
                    np.asarray(tlp, np.float32),
                )

            tokens = list(job.token_ids)
            contexts = [tokens[:t] for t in range(job.score_from, len(tokens))]
            result = TeacherScores(*rows(contexts, tokens[job.score_from :]))
            if job.branches:
                after, before, targets = [], [], []
                for branch in job.branches:
                    path = tokens[: branch.attach]
                    for token in branch.token_ids.tolist():
                        before.append(list(path))
                        targets.append(token)
                        path.append(token)
                    after.append(path)
                result.branch_ids, result.branch_logprobs, _ = rows(after, [-1] * len(after))
                result.branch_token_logprobs = rows(before, targets)[2]
            results.append(result)
        return results


@lru_cache(maxsize=1)
def smollm2_engine(dtype: str = "float32"):
    """The hf engine on SmolLM2-135M-Instruct (one per test session)."""
    from teacher_server.engines import EngineConfig
    from teacher_server.engines.hf import HFEngine
    from testkit.real_model import smollm2_path

    return HFEngine(EngineConfig(model=str(smollm2_path()), dtype=dtype))
