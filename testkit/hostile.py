"""Tokenizers a hostile tenant sends in OpenSession (issue 20's attacks), as tokenizer.json texts.

Each is small on the wire and costly (or fatal) for the tokenizers library to read or run:
tests/teacher_server/test_hostile.py expects each refused quickly, bench/attacks.py measures
what the server pays for it.
"""

from __future__ import annotations

import json


def _bpe(vocab: dict[str, int], merges: list[list[str]] | None = None, **model) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "vocab": vocab, "merges": merges or [], **model},
    }


def backtracking_regex(shortest: int = 22, longest: int = 30) -> str:
    """A Split pre-tokenizer whose regex backtracks on runs of "a" (Fibonacci in the run's length)
    without reaching onig's retry limit: the tokens are runs of a's ended by a "b", the probe text
    is made of them, and every start position of every run costs ~fib(run) steps."""
    tokens = ["a", "b"] + ["a" * length + "b" for length in range(shortest, longest + 1)]
    return _split_by_regex(tokens, "(a|aa)+[^ab]")


def retry_limit_regex() -> str:
    """A regex that hits onig's retry limit on a long run of "a": a panic in Rust."""
    return _split_by_regex(["a" * length for length in range(1, 65)], "(a+)+[^a]")


def _split_by_regex(tokens: list[str], pattern: str) -> str:
    spec = _bpe({token: index for index, token in enumerate(tokens)})
    spec["pre_tokenizer"] = _split(pattern)
    return json.dumps(spec)


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def long_subword_prefix() -> str:
    """A continuing_subword_prefix longer than the tokens it is cut from: BPE panics on a merge."""
    return json.dumps(_bpe({"a": 0, "b": 1, "ab": 2}, [["a", "b"]], continuing_subword_prefix="#" * 50))


def huge_id(index: int = 40_000_000) -> str:
    """One added token at a huge id: tables sized by the largest id would need gigabytes."""
    spec = _bpe({"a": 0, "b": 1})
    spec["added_tokens"] = [
        {"id": index, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    ]  # fmt: skip
    return json.dumps(spec)


def empty_vocabulary(model_type: str = "BPE") -> str:
    spec = _bpe({})
    if model_type == "Unigram":
        spec["model"] = {"type": "Unigram", "unk_id": None, "vocab": []}
    return json.dumps(spec)


def many_tokens(count: int = 1_000_000) -> str:
    """A WordLevel vocabulary of `count` tokens (26 MB at a million)."""
    spec = _bpe({})
    spec["model"] = {"type": "WordLevel", "vocab": {f"w{i}": i for i in range(count)}, "unk_token": "w0"}
    spec["decoder"] = {"type": "Fuse"}
    return json.dumps(spec)


def small_byte_level_bpe() -> str:
    """A byte-level BPE of 256 bytes and a few merges: a real tokenizer cheap to align with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


SEEDS = (small_byte_level_bpe, backtracking_regex, retry_limit_regex, long_subword_prefix, huge_id, empty_vocabulary)
REGEXES = ("(a|aa)+[^ab]", "(a+)+[^a]", "(", "[", "\\p{L}+|\\s+", "(?<=a)b", "a{99999}", "(?i)x*y*z*$", ".*")
ODD_VALUES = (None, -1, 0, 1 << 31, 1 << 62, 40_000_000, 3.5, "", "x" * 10_000, [], {}, True, "\udcff")


def mutated_tokenizers(count: int, seed: int = 0):
    """`count` tokenizer.json texts: the seeds above, each with a few random mutations of its JSON
    (odd values for its fields, deleted keys, regexes, model types, added tokens) or of its bytes."""
    import random

    rng = random.Random(seed)
    seeds = [json.loads(make()) for make in SEEDS]
    for _ in range(count):
        spec = json.loads(json.dumps(rng.choice(seeds)))
        for _ in range(rng.randint(1, 3)):
            _mutate(spec, rng)
        text = json.dumps(spec)
        if rng.random() < 0.2:  # a byte-level mutant: cut, flipped or duplicated characters
            at = rng.randrange(len(text))
            text = rng.choice((text[:at], text[:at] + chr(rng.randrange(32, 127)) + text[at + 1 :], text + text[at:]))
        yield text


def _mutate(spec: dict, rng) -> None:
    choice = rng.randrange(6)
    model = spec.get("model")
    if not isinstance(model, dict) and choice in (1, 3):
        choice = 5
    if choice == 0:
        spec["pre_tokenizer"] = _split(rng.choice(REGEXES))
    elif choice == 1:
        model["type"] = rng.choice(("BPE", "WordPiece", "Unigram", "WordLevel", "Nope"))
    elif choice == 2:
        spec["added_tokens"] = [{"id": rng.choice((5, 300, 1 << 20, -3)), "content": rng.choice(("<x>", "", "a")),
                                 "special": rng.random() < 0.5}]  # fmt: skip
    elif choice == 3:
        model["continuing_subword_prefix"] = "#" * rng.randint(1, 80)
    else:
        _replace_leaf(spec, rng, delete=choice == 4)


def _replace_leaf(node, rng, delete: bool) -> None:
    """Give one leaf of the JSON tree an odd value (or delete its key)."""
    for _ in range(8):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if not isinstance(node[key], (dict, list)) or not node[key] or rng.random() < 0.3:
                if delete:
                    del node[key]
                else:
                    node[key] = rng.choice(ODD_VALUES)
                return
            node = node[key]
        elif isinstance(node, list) and node:
            index = rng.randrange(len(node))
            if not isinstance(node[index], (dict, list)) or rng.random() < 0.3:
                node[index] = rng.choice(ODD_VALUES)
                return
            node = node[index]
        else:
            return
