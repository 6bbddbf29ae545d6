"""Real tokenizers for the alignment tests, built offline from files that PyPI packages ship.

* ``mistral-sp-v1``: Mistral 7B's SentencePiece model (``mistral_common/data/tokenizer.model.v1``;
  metaspace, ``<0xNN>`` byte fallback, dummy prefix), converted with transformers' SentencePiece
  converter.
* ``tekken``: Mistral's tiktoken-style byte-level BPE (``mistral_common/data/tekken_240718.json``),
  1000 control tokens first, then the byte-level ranks.
* ``gpt2``: GPT-2's byte-level BPE from ``whisper/assets/gpt2.tiktoken`` (the package need not be
  importable: only the file is read), with ``<|endoftext|>``.
* ``smollm2``: SmolLM2-135M-Instruct's own tokenizer (tests/real_model.py).

mistral-common and openai-whisper are installed with ``--no-deps`` (.ci/run): only their data
files are used, found with importlib without importing the packages. Converted tokenizers are
cached as tokenizer.json under ~/.cache/opd/tokenizers, keyed by the source file's hash.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

NAMES = ("mistral-sp-v1", "tekken", "gpt2", "smollm2")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opd" / "tokenizers"

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The control tokens of tekken files that predate the "special_tokens" key (mistral_common's
# Tekkenizer.DEPRECATED_SPECIAL_TOKENS, ranks 0..19); ranks up to 999 are "<SPECIAL_{rank}>".
TEKKEN_CONTROL = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
TEKKEN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST]' + message['content'] + '[/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def _package_file(package: str, relative: str) -> Path | None:
    """A data file of an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.exists() else None


SOURCES = {
    "mistral-sp-v1": ("mistral_common", "data/tokenizer.model.v1", "pip install --no-deps mistral-common"),
    "tekken": ("mistral_common", "data/tekken_240718.json", "pip install --no-deps mistral-common"),
    "gpt2": ("whisper", "assets/gpt2.tiktoken", "pip install --no-deps openai-whisper"),
}


def missing_reason(name: str) -> str | None:
    """Why tokenizer `name` cannot be built here, or None."""
    if name == "smollm2":
        from tests.real_model import missing_reason as model_missing

        return model_missing()
    package, relative, install = SOURCES[name]
    if _package_file(package, relative) is None:
        return f"{package}/{relative} not found ({install})"
    if name == "mistral-sp-v1" and importlib.util.find_spec("sentencepiece") is None:
        return "sentencepiece is not installed (pip install sentencepiece)"
    return None


@lru_cache(maxsize=None)
def load(name: str):
    """The transformers fast tokenizer `name` (one of NAMES)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "smollm2":
        from tests.real_model import smollm2_path

        return AutoTokenizer.from_pretrained(smollm2_path())
    package, relative, _ = SOURCES[name]
    source = _package_file(package, relative)
    if source is None:
        raise FileNotFoundError(missing_reason(name))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cached = CACHE / f"{name}-{digest}.json"
    if not cached.exists():
        backend = {"mistral-sp-v1": _sentencepiece, "tekken": _tekken, "gpt2": _gpt2}[name](source)
        CACHE.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=CACHE, suffix=".json")
        os.close(handle)
        backend.save(staging)
        os.replace(staging, cached)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(cached))
    if name == "mistral-sp-v1":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            chat_template=MISTRAL_TEMPLATE,
        )
    if name == "tekken":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            chat_template=TEKKEN_TEMPLATE,
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def available() -> list[str]:
    return [name for name in NAMES if missing_reason(name) is None]


# ----------------------------------------------------------------------------- converters


def _sentencepiece(source: Path):
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(source.read_bytes())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # legacy=False: the dummy prefix only at the start of the text, as SentencePiece itself does.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    control = [piece.piece for piece in proto.pieces if piece.type in (2, 3)]  # UNKNOWN, CONTROL
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    return backend


def _byte_level_bpe(ranks: list[bytes], pattern: str, specials: list[str], first_id: int):
    """A byte-level BPE fast tokenizer equivalent to tiktoken with these mergeable ranks.

    Ids are rank + first_id; `specials` take ids 0.. (tekken) or follow the ranks (gpt2).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    strings = ["".join(table[b] for b in token) for token in ranks]
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    merges = []
    for rank, token in enumerate(ranks):
        # tiktoken merges the adjacent pair whose concatenation has the lowest rank: every
        # split of a token into two known tokens is a merge with the token's own priority.
        for cut in range(1, len(token)):
            left, right = rank_of.get(token[:cut]), rank_of.get(token[cut:])
            if left is not None and right is not None:
                merges.append((rank, left, right))
    merges.sort()
    vocab = {string: rank + first_id for rank, string in enumerate(strings)}
    backend = Tokenizer(models.BPE(vocab, [(strings[l], strings[r]) for _, l, r in merges], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    if first_id:  # the control tokens come first: give them their ids in the vocabulary
        model = json.loads(backend.to_str())
        model["model"]["vocab"].update({token: index for index, token in enumerate(specials)})
        backend = Tokenizer.from_str(json.dumps(model))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return backend


def _tekken(source: Path):
    raw = json.loads(source.read_text())
    config = raw["config"]
    specials = [entry["token_str"] for entry in sorted(raw.get("special_tokens") or [], key=lambda e: e["rank"])]
    specials = specials or list(TEKKEN_CONTROL)
    count = config["default_num_special_tokens"]
    specials += [f"<SPECIAL_{rank}>" for rank in range(len(specials), count)]
    inner = config["default_vocab_size"] - count
    ranks = [base64.b64decode(entry["token_bytes"]) for entry in raw["vocab"][:inner]]
    return _byte_level_bpe(ranks, config["pattern"], specials, first_id=count)


def _gpt2(source: Path):
    ranks = []
    for line in source.read_text().splitlines():
        if line:
            token, rank = line.split()
            assert int(rank) == len(ranks), "gpt2.tiktoken ranks are dense"
            ranks.append(base64.b64decode(token))
    backend = _byte_level_bpe(ranks, GPT2_PATTERN, [], first_id=0)
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert backend.token_to_id("<|endoftext|>") == len(ranks)
    return backend


# ----------------------------------------------------------------------------- teacher stand-ins


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
                    contexts += list(branch.token_ids)
                    targets += [-1] * len(branch.token_ids)
                    before += [tokens[branch.attach - 1], *branch.token_ids[:-1]]
                    before_targets += list(branch.token_ids)
                result.branch_ids, result.branch_logprobs, _ = rows(contexts, targets)
                result.branch_token_logprobs = rows(before, before_targets)[2]
            results.append(result)
        return results


# ----------------------------------------------------------------------------- alignment helpers


@lru_cache(maxsize=None)
def table(name: str):
    """The byte table of tokenizer `name` (cached for the test session)."""
    from teacher_server.alignment.byte_tables import byte_table

    tokenizer = load(name)
    return byte_table(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_tokens)


@lru_cache(maxsize=None)
def teacher_text(name: str):
    """Tokenizer `name` as the teacher's side of alignment."""
    from teacher_server.alignment.text import TeacherText

    tokenizer = load(name)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return TeacherText(
        table(name), tokenizer.backend_tokenizer.to_str(), template, tokenizer.bos_token, tokenizer.eos_token
    )


def cross(student: str, teacher: str, engine, options=None, pairs=(), pair_eos: bool = True):
    """A CrossTokenizer for (student, teacher) as a session would build it."""
    from teacher_server.alignment.cross import CrossOptions, CrossTokenizer
    from teacher_server.alignment.specials import special_map

    s, t = load(student), load(teacher)
    specials = special_map(table(student), table(teacher), [s.eos_token], [t.eos_token_id], pairs, pair_eos)
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
                        after.append(list(path))
                result.branch_ids, result.branch_logprobs, _ = rows(after, [-1] * len(after))
                result.branch_token_logprobs = rows(before, targets)[2]
            results.append(result)
        return results


@lru_cache(maxsize=1)
def smollm2_engine():
    """The hf engine on SmolLM2-135M-Instruct (one per test session)."""
    from teacher_server.engines import EngineConfig
    from teacher_server.engines.hf import HFEngine
    from tests.real_model import smollm2_path

    return HFEngine(EngineConfig(model=str(smollm2_path())))


def gsm8k(path: Path | None = None) -> list[dict]:
    """The GSM8K test set shipped in shared/ (question, answer)."""
    path = path or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
