"""Packs concurrent scoring jobs into engine batches by a token budget.

Jobs wait in one queue per session; batches are filled round-robin across
sessions so that one experiment flooding the service cannot starve another.
The engine runs in one worker thread, so the event loop keeps serving RPCs
while a batch is on the device. A job whose caller went away (cancelled RPC,
expired deadline) is dropped before it reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from teacher_server.engines import Engine, ScoringJob, TeacherScores
from teacher_server.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    # Padded tokens (batch size x longest sequence) in one forward pass.
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    # Jobs waiting in the queue, over all sessions; beyond it: RESOURCE_EXHAUSTED.
    max_queued_jobs: int = 1024


@dataclass
class _Pending:
    job: ScoringJob
    result: asyncio.Future = field(repr=False)


@dataclass
class SchedulerStats:
    batches: int = 0
    jobs_scored: int = 0
    jobs_dropped: int = 0
    positions_scored: int = 0


class Scheduler:
    def __init__(self, engine: Engine, limits: SchedulerLimits = SchedulerLimits()) -> None:
        self.engine = engine
        self.limits = limits
        self.stats = SchedulerStats()
        self._queues: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, session_id: str, job: ScoringJob) -> TeacherScores:
        """Queue `job` and wait for its scores; cancelling the caller drops the job."""
        if self._loop_task is None or self._loop_task.done():
            raise Unavailable("the scheduler is not running; retry against a healthy replica")
        if self._queued >= self.limits.max_queued_jobs:
            raise ResourceExhausted(
                f"the teacher queue is full ({self.limits.max_queued_jobs} jobs); retry with backoff "
                "or send fewer requests at once"
            )
        pending = _Pending(job, asyncio.get_running_loop().create_future())
        self._queues.setdefault(session_id, deque()).append(pending)
        self._queued += 1
        self._wakeup.set()
        # The future is cancelled with the awaiting task; _next_batch skips it.
        return await pending.result

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        longest = 0
        while self._queues:
            session_id, queue = next(iter(self._queues.items()))
            pending = queue[0]
            if pending.result.cancelled():
                self._pop(session_id)
                self.stats.jobs_dropped += 1
                continue
            tokens = len(pending.job.token_ids)
            padded = (len(batch) + 1) * max(longest, tokens)
            if batch and (padded > self.limits.max_batch_tokens or len(batch) >= self.limits.max_batch_size):
                break
            batch.append(self._pop(session_id))
            longest = max(longest, tokens)
            # Round robin: a session that just gave a job moves to the back.
            if session_id in self._queues:
                self._queues.move_to_end(session_id)
        return batch

    def _pop(self, session_id: str) -> _Pending:
        queue = self._queues[session_id]
        pending = queue.popleft()
        if not queue:
            del self._queues[session_id]
        self._queued -= 1
        return pending

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._next_batch():
                try:
                    results = await loop.run_in_executor(self._executor, self.engine.score, [p.job for p in batch])
                except Exception as error:  # one bad batch must not take the service down
                    log.exception("engine failed on a batch of %d jobs", len(batch))
                    for pending in batch:
                        if not pending.result.done():
                            pending.result.set_exception(error)
                    continue
                self.stats.batches += 1
                for pending, scores in zip(batch, results):
                    self.stats.jobs_scored += 1
                    self.stats.positions_scored += pending.job.num_positions
                    if not pending.result.done():
                        pending.result.set_result(scores)
