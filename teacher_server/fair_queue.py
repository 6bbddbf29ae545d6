"""Deficit round robin (DRR, Shreedhar & Varghese 1995) by tokens over keyed FIFO queues of jobs.

    Every active key (a tenant, or a session within one) sits in a ring with a deficit counter
    (a token credit). The key at the head may send its next job while the job's cost (its
    tokens) is within its credit; the cost is then taken from the credit. When the next job
    costs more than is left, the key goes to the back of the ring with `quantum` more credit
    for its next turn. A key whose queue empties leaves the ring and forgets its credit (no
    banking of credit while idle).

With `new_first`, a key that becomes active joins at the front of the ring with one quantum,
so its job is served next; the key it interrupts keeps its credit for after. This is
FQ-CoDel's "new flows first" (RFC 8290): it gives light tenants low latency and cannot be
used to take more than a fair share, because only a key whose queue ran empty gets it, and
a key that floods never runs empty.

A queue's jobs are anything with `cost` (tokens) and `result` (an asyncio future: a cancelled
one is dropped, not served).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Generic, Hashable, Protocol, TypeVar


class QueuedJob(Protocol):
    cost: int
    result: asyncio.Future


K = TypeVar("K", bound=Hashable)


class DeficitRoundRobin(Generic[K]):
    """DRR over keyed FIFO queues of jobs; a queue may itself be a DeficitRoundRobin.

    `peek()` names the job DRR serves next (dropping cancelled jobs it meets on the
    way), `pop()` serves it. Both may rotate the ring; that is the algorithm, not a
    side effect: a turn ends when the head cannot afford its next job.
    """

    def __init__(self, quantum: int, on_drop, new_first: bool = False) -> None:
        self.quantum = max(1, quantum)
        self.new_first = new_first  # a key that (re)joins goes to the front, not the back
        self._on_drop = on_drop  # called with each cancelled job taken off a queue
        self._ring: OrderedDict[K, deque[QueuedJob] | DeficitRoundRobin] = OrderedDict()
        self._credit: dict[K, int] = {}

    def __bool__(self) -> bool:
        return bool(self._ring)

    def queue(self, key: K, factory) -> deque[QueuedJob] | DeficitRoundRobin:
        """The queue of `key`, joining the back of the ring with one quantum if new."""
        if key not in self._ring:
            self._ring[key] = factory()
            self._credit[key] = self.quantum
            if self.new_first:
                self._ring.move_to_end(key, last=False)
        return self._ring[key]

    def items(self):
        for child in self._ring.values():
            yield from (child.items() if isinstance(child, DeficitRoundRobin) else child)

    def peek(self) -> QueuedJob | None:
        while self._ring:
            key, child = next(iter(self._ring.items()))
            head = self._head(child)
            if head is None:  # emptied by cancellations
                self._leave(key)
            elif head.cost <= self._credit[key]:
                return head
            else:  # the turn is over: back of the ring, one more quantum for next time
                self._credit[key] += self.quantum
                self._ring.move_to_end(key)
        return None

    def pop(self) -> QueuedJob:
        head = self.peek()
        assert head is not None, "pop() on an empty queue"
        key, child = next(iter(self._ring.items()))
        self._credit[key] -= head.cost
        if isinstance(child, DeficitRoundRobin):
            child.pop()
        else:
            child.popleft()
        if not child:
            self._leave(key)
        return head

    def _head(self, child) -> QueuedJob | None:
        if isinstance(child, DeficitRoundRobin):
            return child.peek()
        while child and child[0].result.cancelled():
            self._on_drop(child.popleft())
        return child[0] if child else None

    def _leave(self, key: K) -> None:
        del self._ring[key]
        del self._credit[key]
