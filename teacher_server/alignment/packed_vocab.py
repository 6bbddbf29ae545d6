"""A tokenizer's vocabulary (string -> id) as four arrays instead of a dict.

A dict of a 150k-token vocabulary is 300k small Python objects. A server that receives one with
every cross-tokenizer session and frees it at close fragments its small-object heap: CPython
returns an arena of small objects to the system only once every object in it is gone, and the
server's own long-lived objects land between the vocabulary's, so it grew by tens of MiB with
every round of sessions opened and closed. Packed, a vocabulary is allocated and freed whole.
Lookups by string (special-token pairing, a few per session) hash the string and compare bytes."""

from dataclasses import dataclass
from typing import Iterator, Mapping
import zlib

import numpy as np


@dataclass(frozen=True, eq=False)
class PackedVocab(Mapping[str, int]):
    data: np.ndarray  # uint8: every string's UTF-8, back to back, in the order of `hashes`
    starts: np.ndarray  # int64 [N + 1]: string i is data[starts[i]:starts[i + 1]]
    hashes: np.ndarray  # uint32 [N], sorted: CRC-32 of each string's UTF-8
    ids: np.ndarray  # int64 [N]: each string's id

    @classmethod
    def of(cls, vocab: Mapping[str, int]) -> "PackedVocab":
        encoded = [_utf8(string) for string in vocab]
        hashes = np.fromiter(map(zlib.crc32, encoded), dtype=np.uint32, count=len(encoded))
        order = np.argsort(hashes, kind="stable")
        ordered = [encoded[entry] for entry in order]
        starts = np.zeros(len(ordered) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, ordered), dtype=np.int64, count=len(ordered)), out=starts[1:])
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))[order]
        return cls(np.frombuffer(b"".join(ordered), dtype=np.uint8), starts, hashes[order], ids)

    def __getitem__(self, string: str) -> int:
        if not isinstance(string, str):
            raise KeyError(string)
        encoded = _utf8(string)
        key = np.uint32(zlib.crc32(encoded))
        low, high = np.searchsorted(self.hashes, key, "left"), np.searchsorted(self.hashes, key, "right")
        for entry in range(int(low), int(high)):  # strings that share a hash: compare their bytes
            if self._bytes(entry) == encoded:
                return int(self.ids[entry])
        raise KeyError(string)

    def __iter__(self) -> Iterator[str]:
        return (self._bytes(entry).decode("utf-8", "surrogatepass") for entry in range(len(self.ids)))

    def __len__(self) -> int:
        return len(self.ids)

    def _bytes(self, entry: int) -> bytes:
        return self.data[self.starts[entry] : self.starts[entry + 1]].tobytes()


def _utf8(string: str) -> bytes:
    # A JSON vocabulary may hold lone surrogates ("\ud800"): kept, not refused.
    return string.encode("utf-8", "surrogatepass")
