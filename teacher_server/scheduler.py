"""Packs concurrent scoring jobs into engine batches, fairly across tenants, within limits.

Fairness: deficit round robin by tokens (fair_queue.DeficitRoundRobin) on two levels:
tenants, then the sessions of each tenant. Sessions are content-addressed and may be
shared by tenants, so a queue belongs to a (tenant, session) pair. A tenant that becomes
active joins at the front ("new flows first"), so its job goes into the very next batch;
sessions inside a tenant join at the back.

Each tenant thus gets about the same number of tokens per round whatever its queue
length, so a tenant flooding the queue with thousands of jobs delays a light tenant's job
by at most one quantum of its own work plus the batch already on the device. Batches are
filled by popping jobs in DRR order until the token budget, the batch size or the time
bound (the tokens the engine runs in `max_batch_seconds` at its recent throughput) is
reached; the DRR state carries over from one batch to the next.

Lanes: each engine (a loaded model, with the LoRA adapters hosted over it) has its own
fair queue and its own worker thread, so the teachers of a server run side by side: a
batch of a large teacher does not hold up a small one's jobs (on a GPU their kernels
interleave; teachers placed on different devices run in parallel). Inside a lane a batch
holds the jobs of one teacher (one adapter in force) and ends where DRR's next job
belongs to another. The price: the lanes' batches are in memory at the same time.

Limits (SchedulerLimits) hold over all lanes: a request longer than `max_request_tokens`
is refused outright; per tenant, the tokens waiting in the queues and the requests in
flight (queued or on a device) are capped, and so are queued jobs over all tenants. Over
a cap, RESOURCE_EXHAUSTED carries a retry hint: the time the engine needs, at its recent
throughput, to work off what the tenant already has queued.

The worker threads leave the event loop free to serve RPCs while batches run. A job
whose caller went away (cancelled RPC, expired deadline) is dropped before it reaches the
engine; its tenant's quota is released at once. `drain()` refuses new jobs (UNAVAILABLE)
while accepted ones finish; `wait_idle()` returns when none is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from teacher_server.engines import Engine, ScoringJob, TeacherScores
from teacher_server.engines.adapters import AdapterTeacher
from teacher_server.errors import ResourceExhausted, Unavailable
from teacher_server.fair_queue import DeficitRoundRobin
from teacher_server.teacher_specs import DEFAULT_TEACHER
from teacher_server.tenancy import current_tenant

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    # Padded tokens (batch size x longest sequence) in one forward pass.
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    # ... and no more tokens than the engine runs in this long at its recent throughput (at least
    # one job): a light tenant's job waits at most about this for the batch on the device. A GPU
    # fills whole batches within it; 2 CPU cores take seconds for a full one. 0: no time bound.
    max_batch_seconds: float = 0.5
    # Jobs waiting in the queue, over all tenants; beyond it: RESOURCE_EXHAUSTED.
    max_queued_jobs: int = 1024
    # DRR credit a tenant (and a session within it) gets per turn, in tokens. Smaller
    # interleaves tenants more finely; below one job's size it costs only loop turns.
    quantum_tokens: int = 256
    # Per tenant: tokens waiting in the queue, and requests queued or on the device.
    max_tenant_queued_tokens: int = 262_144
    max_tenant_in_flight: int = 512
    # One request's tokens (its sequence plus any alignment branches).
    max_request_tokens: int = 65_536


@dataclass(frozen=True, eq=False)
class TeacherEngine:
    """A hosted teacher as the scheduler knows it: its name (metrics) and its engine."""

    name: str
    engine: Engine

    @property
    def runs_on(self) -> object:
        """The engine object that runs its batches, its lane's key: the base for a LoRA adapter."""
        return self.engine.base if isinstance(self.engine, AdapterTeacher) else self.engine


def job_cost(job: ScoringJob) -> int:
    """Tokens the engine runs for `job`: the DRR cost and the unit of the limits."""
    return len(job.token_ids) + getattr(job, "num_branch_tokens", 0)


@dataclass
class _Pending:
    tenant: str
    job: ScoringJob
    result: asyncio.Future = field(repr=False)
    teacher: TeacherEngine
    cost: int = 0
    queued_at: float = 0.0
    dequeued: bool = False  # taken into a batch (or dropped): no longer counts as queued


@dataclass
class SchedulerStats:
    jobs_accepted: int = 0
    batches: int = 0
    jobs_scored: int = 0
    jobs_dropped: int = 0
    positions_scored: int = 0


@dataclass
class _TenantLoad:
    queued_jobs: int = 0
    queued_tokens: int = 0
    in_flight: int = 0


class _Lane:
    """One engine's queue (tenant -> session -> FIFO of jobs) and the worker that runs its batches."""

    def __init__(self, quantum: int, on_drop, run, name: str) -> None:
        """`run(lane)`: the coroutine that serves the lane, started now as its task."""
        self.queues: DeficitRoundRobin[str] = DeficitRoundRobin(quantum, on_drop, new_first=True)
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.task = asyncio.get_running_loop().create_task(run(self), name=name)


class Scheduler:
    def __init__(
        self, engine: Engine, limits: SchedulerLimits = SchedulerLimits(), metrics: TeacherMetrics | None = None
    ) -> None:
        """`engine`: the teacher of jobs submitted without one (the default teacher)."""
        self.engine = engine
        self.default_teacher = TeacherEngine(DEFAULT_TEACHER, engine)
        self.limits = limits
        self.metrics = metrics
        self.stats = SchedulerStats()
        self.draining = False
        self._lanes: dict[object, _Lane] = {}  # TeacherEngine.runs_on -> its lane
        self._running = False
        self._load: dict[str, _TenantLoad] = {}
        self._queued = 0
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokens_per_s = 0.0  # recent engine throughput, for retry hints
        self._teacher_tokens_per_s: dict[str, float] = {}  # ... of each teacher, for the batches' time bound

    def start(self) -> None:
        self._running = True
        self._lane(self.default_teacher)

    async def stop(self) -> None:
        self._running = False
        tasks = [lane.task for lane in self._lanes.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=True)

    def drain(self) -> None:
        """Refuse new jobs from now on; accepted ones still run."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no accepted job is queued or running; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def queued_jobs(self) -> list[_Pending]:
        """Jobs still in the queues (cancelled ones included until they are dropped)."""
        return [pending for lane in self._lanes.values() for pending in lane.queues.items()]

    def load(self, tenant: str) -> _TenantLoad:
        return self._load.get(tenant, _TenantLoad())

    def _lane(self, teacher: TeacherEngine) -> _Lane:
        """The lane of `teacher`'s engine, opened (and its worker started) on first use."""
        lane = self._lanes.get(teacher.runs_on)
        if lane is None:
            lane = _Lane(self.limits.quantum_tokens, self._dropped, self._run, f"scheduler:{teacher.name}")
            self._lanes[teacher.runs_on] = lane
        return lane

    async def submit(
        self, session_id: str, job: ScoringJob, tenant: str | None = None, teacher: TeacherEngine | None = None
    ) -> TeacherScores:
        """Queue `job` for `tenant` and wait for `teacher`'s scores; cancelling the caller drops the job.

        `tenant` defaults to the tenant of the current RPC (tenancy.current_tenant()), `teacher` to
        the scheduler's default one.
        """
        tenant = current_tenant() if tenant is None else tenant
        if self.draining:
            raise Unavailable("the teacher is shutting down (draining); retry against another replica")
        teacher = teacher or self.default_teacher
        lane = self._lane(teacher) if self._running else None
        if lane is None or lane.task.done():
            raise Unavailable("the scheduler is not running; retry against a healthy replica")
        cost = job_cost(job)
        self._admit(tenant, cost)
        load = self._load.setdefault(tenant, _TenantLoad())
        pending = _Pending(
            tenant,
            job,
            asyncio.get_running_loop().create_future(),
            teacher,
            cost,
            time.monotonic(),
        )
        self.stats.jobs_accepted += 1
        lane.queues.queue(tenant, self._session_ring).queue(session_id, deque).append(pending)
        self._queued += 1
        self._in_flight += 1
        self._idle.clear()
        load.queued_jobs += 1
        load.queued_tokens += cost
        load.in_flight += 1
        self._observe_queue(tenant)
        lane.wakeup.set()
        try:
            # The future is cancelled with the awaiting task; the queue drops it when it comes up.
            return await pending.result
        finally:
            # Released here, not when the queue drops the job: a cancelled job stops counting at once.
            if not pending.dequeued:
                pending.dequeued = True
                self._queued -= 1
                load.queued_jobs -= 1
                load.queued_tokens -= cost
            load.in_flight -= 1
            self._in_flight -= 1
            if load.in_flight == 0:
                del self._load[tenant]
            if self._in_flight == 0:
                self._idle.set()
            self._observe_queue(tenant)

    def _session_ring(self) -> DeficitRoundRobin[str]:
        return DeficitRoundRobin(self.limits.quantum_tokens, self._dropped)

    def _admit(self, tenant: str, cost: int) -> None:
        limits, load = self.limits, self._load.get(tenant, _TenantLoad())
        if cost > limits.max_request_tokens:
            self._rejected(tenant, "request_tokens")
            raise ResourceExhausted(
                f"the request has {cost} tokens, over this teacher's limit of {limits.max_request_tokens} "
                "per request; send shorter rollouts"
            )
        if self._queued >= limits.max_queued_jobs:
            self._rejected(tenant, "queued_jobs")
            raise ResourceExhausted(
                f"the teacher queue is full ({limits.max_queued_jobs} jobs); retry with backoff or send fewer "
                "requests at once",
                retry_after_s=self._retry_after(sum(p.cost for p in self.queued_jobs())),
            )
        if load.in_flight >= limits.max_tenant_in_flight:
            self._rejected(tenant, "tenant_in_flight")
            raise ResourceExhausted(
                f"tenant {tenant!r} has {load.in_flight} requests in flight, the limit is "
                f"{limits.max_tenant_in_flight}; wait for answers before sending more",
                retry_after_s=self._retry_after(load.queued_tokens),
            )
        if load.queued_tokens + cost > limits.max_tenant_queued_tokens:
            self._rejected(tenant, "tenant_queued_tokens")
            raise ResourceExhausted(
                f"tenant {tenant!r} has {load.queued_tokens} tokens queued; with this request's {cost} that is "
                f"over the limit of {limits.max_tenant_queued_tokens}",
                retry_after_s=self._retry_after(load.queued_tokens + cost),
            )

    def _retry_after(self, tokens: int) -> float:
        """Seconds the engine needs for `tokens` at its recent throughput, within [0.05, 30]."""
        rate = self._tokens_per_s or 2000.0  # before any batch: a guess, only the first hint uses it
        return min(30.0, max(0.05, tokens / rate))

    def _dropped(self, pending: _Pending) -> None:
        self.stats.jobs_dropped += 1

    def _next_batch(self, queues: DeficitRoundRobin[str]) -> list[_Pending]:
        batch: list[_Pending] = []
        longest, cost = 0, 0
        limits = self.limits
        timely = None
        while (head := queues.peek()) is not None:
            if not batch:
                rate = self._teacher_tokens_per_s.get(head.teacher.name, 0.0)
                timely = rate * limits.max_batch_seconds if rate and limits.max_batch_seconds else None
            elif head.teacher is not batch[0].teacher:
                break
            tokens = len(head.job.token_ids)
            padded = (len(batch) + 1) * max(longest, tokens)
            full = padded > limits.max_batch_tokens or len(batch) >= limits.max_batch_size
            if batch and (full or (timely is not None and cost + head.cost > timely)):
                break
            pending = queues.pop()
            if not pending.dequeued:
                pending.dequeued = True
                self._queued -= 1
                load = self._load[pending.tenant]
                load.queued_jobs -= 1
                load.queued_tokens -= pending.cost
            batch.append(pending)
            longest, cost = max(longest, tokens), cost + pending.cost
        return batch

    async def _run(self, lane: _Lane) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                await lane.wakeup.wait()
                lane.wakeup.clear()
                while batch := self._next_batch(lane.queues):
                    if self.metrics is not None:
                        now = time.monotonic()
                        for pending in batch:
                            self.metrics.queue_wait(pending.tenant, now - pending.queued_at)
                            self._observe_queue(pending.tenant)
                    await self._run_batch(lane, batch)
        except Exception:
            # A bug here must not leave requests waiting forever: answer them, and refuse new
            # ones (submit sees the loop is done), so clients go to a healthy replica.
            log.exception("the scheduler loop failed; failing the jobs in flight and in the queue")
            failure = Unavailable("the teacher's scheduler failed; retry against a healthy replica")
            self._fail(batch + list(lane.queues.items()), failure)
            raise

    async def _run_batch(self, lane: _Lane, batch: list[_Pending]) -> None:
        started = time.monotonic()
        try:
            results = await self._score(lane, batch)
        except Exception as error:
            if len(batch) == 1:
                log.exception("engine failed on a job")
                self._fail(batch, error)
                return
            # One bad job (or tenant) must not fail the jobs it happened to share a batch
            # with: score them one at a time, so only the job at fault gets the error.
            log.warning("engine failed on a batch of %d jobs (%s); scoring them one by one", len(batch), error)
            for pending in batch:
                await self._run_batch(lane, [pending])
            return
        self._deliver(batch, results, started)

    async def _score(self, lane: _Lane, batch: list[_Pending]) -> list:
        results = await asyncio.get_running_loop().run_in_executor(
            lane.executor, batch[0].teacher.engine.score, [p.job for p in batch]
        )
        if len(results) != len(batch):
            raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} jobs")
        return results

    def _deliver(self, batch: list[_Pending], results: list, started: float) -> None:
        self._record_batch(batch, time.monotonic() - started)
        for pending, scores in zip(batch, results):
            self.stats.jobs_scored += 1
            self.stats.positions_scored += pending.job.num_positions
            if not pending.result.done():
                pending.result.set_result(scores)

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for pending in batch:
            if not pending.result.done():
                pending.result.set_exception(error)

    def _record_batch(self, batch: list[_Pending], seconds: float) -> None:
        self.stats.batches += 1
        tokens = sum(p.cost for p in batch)
        rate = tokens / max(seconds, 1e-6)
        self._tokens_per_s = _recent(self._tokens_per_s, rate)
        teacher = batch[0].teacher.name
        self._teacher_tokens_per_s[teacher] = _recent(self._teacher_tokens_per_s.get(teacher, 0.0), rate)
        if self.metrics is not None:
            self.metrics.batch(teacher, len(batch), tokens, seconds)
            for pending in batch:
                share = seconds * pending.cost / max(tokens, 1)
                self.metrics.scored(pending.tenant, teacher, pending.job.num_positions, share)

    def _observe_queue(self, tenant: str) -> None:
        if self.metrics is not None:
            load = self._load.get(tenant, _TenantLoad())
            self.metrics.queue(tenant, load.queued_jobs, load.queued_tokens, load.in_flight)

    def _rejected(self, tenant: str, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(tenant, limit)


def _recent(average: float, value: float) -> float:
    """An exponentially weighted average of throughputs (the first value as it is)."""
    return value if not average else 0.8 * average + 0.2 * value
