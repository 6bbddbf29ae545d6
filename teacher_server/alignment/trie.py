"""A byte trie of a vocabulary, walked with numpy for many strings at once.

Nodes are the distinct prefixes of the vocabulary's token bytes (node 0 is the
empty prefix). Edges live in one sorted array of keys parent * 256 + byte, so a
step for a whole batch of walkers is one `searchsorted`: no Python loop per
walker. The projection uses it to find, for teacher bytes, the longest student
token they begin with, and whether a longer student token could still follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher_server.alignment.byte_tables import ByteTable


@dataclass(frozen=True, eq=False)
class ByteTrie:
    keys: np.ndarray  # int64 [E], sorted: parent * 256 + byte
    children: np.ndarray  # int64 [E]: the node that edge leads to
    token_at: np.ndarray  # int64 [nodes]: preferred token whose bytes end at this node, -1 if none
    depth: np.ndarray  # int64 [nodes]: bytes from the root
    has_longer: np.ndarray  # bool [nodes]: some token continues below this node
    below: np.ndarray  # int64 [nodes]: tokens whose bytes begin with this node's prefix
    # Node of every prefix of every token: node of token t's first d bytes is
    # prefix_nodes[token_starts[t] + d], d = 0 .. len(t).
    prefix_nodes: np.ndarray
    token_starts: np.ndarray

    def step(self, nodes: np.ndarray, units: np.ndarray) -> np.ndarray:
        """The child of each node along each unit (a byte; anything >= 256 has no edge), -1 if none."""
        keys = nodes.astype(np.int64) * 256 + units.astype(np.int64)
        keys[(nodes < 0) | (units > 255)] = -1
        at = np.searchsorted(self.keys, keys)
        at = np.minimum(at, len(self.keys) - 1)
        found = self.keys[at] == keys
        return np.where(found, self.children[at], -1)

    def walk(self, nodes: np.ndarray, data: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        """Walk every node along data[starts[i]:ends[i]].

        Returns (end node, -1 where the walk fell off the trie; the longest token met
        on the way, -1 if none; its depth below the starting node, 0 if none).
        """
        node = nodes.astype(np.int64).copy()
        best = np.full(len(node), -1, dtype=np.int64)
        best_depth = np.zeros(len(node), dtype=np.int64)
        active = np.flatnonzero((node >= 0) & (starts < ends))
        offset = 0
        while len(active):
            child = self.step(node[active], data[starts[active] + offset])
            node[active] = child
            alive = child >= 0
            hit = alive & (self.token_at[np.maximum(child, 0)] >= 0)
            best[active[hit]] = self.token_at[child[hit]]
            best_depth[active[hit]] = offset + 1
            offset += 1
            active = active[alive & (starts[active] + offset < ends[active])]
        return node, best, best_depth


def build_trie(table: ByteTable) -> ByteTrie:
    """The trie of every non-special token of `table`."""
    edges: dict[int, int] = {}
    depth = [0]
    token_at = [-1]
    lengths = table.lengths
    prefix_nodes = np.zeros(int(lengths.sum()) + table.vocab_size, dtype=np.int64)
    token_starts = np.zeros(table.vocab_size + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=token_starts[1:])
    for index, token in enumerate(table.tokens):
        node = 0
        base = token_starts[index]
        for offset, byte in enumerate(token):
            key = node * 256 + byte
            child = edges.get(key)
            if child is None:
                child = edges[key] = len(depth)
                depth.append(offset + 1)
                token_at.append(-1)
            node = child
            prefix_nodes[base + offset + 1] = node
        if token and table.preferred[index]:
            token_at[node] = index
    keys = np.fromiter(edges.keys(), dtype=np.int64, count=len(edges))
    children = np.fromiter(edges.values(), dtype=np.int64, count=len(edges))
    order = np.argsort(keys)
    has_longer = np.zeros(len(depth), dtype=bool)
    has_longer[keys // 256] = True
    # Tokens below each node: count where tokens end, then add children into parents, deepest first.
    depth_array = np.asarray(depth, dtype=np.int64)
    ends = prefix_nodes[token_starts[1:] - 1][lengths > 0]
    below = np.bincount(ends, minlength=len(depth)).astype(np.int64)
    parent = np.zeros(len(depth), dtype=np.int64)
    parent[children] = keys // 256
    for level in range(int(depth_array.max(initial=0)), 0, -1):
        at = np.flatnonzero(depth_array == level)
        np.add.at(below, parent[at], below[at])
    return ByteTrie(
        keys=keys[order],
        children=children[order],
        token_at=np.asarray(token_at, dtype=np.int64),
        depth=np.asarray(depth, dtype=np.int64),
        has_longer=has_longer,
        below=below,
        prefix_nodes=prefix_nodes,
        token_starts=token_starts,
    )
