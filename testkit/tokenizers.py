"""Real tokenizers for the alignment tests, built offline from files that PyPI packages ship.

* ``mistral-sp-v1``: Mistral 7B's SentencePiece model (``mistral_common/data/tokenizer.model.v1``;
  metaspace, ``<0xNN>`` byte fallback, dummy prefix), converted with transformers' SentencePiece
  converter.
* ``tekken``: Mistral's tiktoken-style byte-level BPE (``mistral_common/data/tekken_240718.json``),
  1000 control tokens first, then the byte-level ranks.
* ``gpt2``: GPT-2's byte-level BPE from ``whisper/assets/gpt2.tiktoken`` (the package need not be
  importable: only the file is read), with ``<|endoftext|>``.
* ``smollm2``: SmolLM2-135M-Instruct's own tokenizer (testkit/real_model.py).

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
        from testkit.real_model import missing_reason as model_missing

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
        from testkit.real_model import smollm2_path

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
    if name in ("mistral-sp-v1", "tekken"):
        extra = {"pad_token": "<pad>", "chat_template": TEKKEN_TEMPLATE} if name == "tekken" else {}
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            **{"chat_template": MISTRAL_TEMPLATE, **extra},
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


@lru_cache(maxsize=None)
def table(name: str):
    """The byte table of tokenizer `name` (cached for the test session: byte_table's own cache
    keeps a table only while something holds it)."""
    from teacher_server.alignment.byte_tables import byte_table

    tokenizer = load(name)
    return byte_table(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_tokens)


@lru_cache(maxsize=None)
def teacher_text(name: str):
    """Tokenizer `name` as the teacher's side of alignment."""
    from teacher_server.alignment.chat import TeacherChat
    from teacher_server.alignment.text import TeacherText

    tokenizer = load(name)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    chat = TeacherChat(tokenizer.backend_tokenizer.to_str(), template, tokenizer.bos_token, tokenizer.eos_token)
    return TeacherText(table(name), chat)


def gsm8k(path: Path | None = None) -> list[dict]:
    """The GSM8K test set shipped in shared/ (question, answer)."""
    path = path or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
