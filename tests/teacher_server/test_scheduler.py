"""The scheduler on its own: deficit round robin across tenants and sessions, limits, drain.

A recording engine stands in for the model (the scheduler is engine-agnostic), so
the order of service is checked exactly, without timing (one test gives it a known speed).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from teacher_server.engines import ScoringJob, TeacherScores
from teacher_server.engines.adapters import AdapterTeacher
from teacher_server.errors import ResourceExhausted, Unavailable
from teacher_server.scheduler import Scheduler, SchedulerLimits, TeacherEngine


class RecordingEngine:
    """Returns empty scores; remembers each batch as a list of job tags. `gate` holds the first batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def score(self, jobs):
        self.entered.set()
        assert self.gate.wait(30)
        self.batches.append([job.tag for job in jobs])
        return [
            TeacherScores(
                ids=np.zeros((job.num_positions, 1), np.int32),
                logprobs=np.zeros((job.num_positions, 1), np.float32),
                token_logprobs=np.zeros(job.num_positions, np.float32),
            )
            for job in jobs
        ]


def job(tag: str, tokens: int) -> ScoringJob:
    scoring = ScoringJob(token_ids=np.arange(tokens, dtype=np.int32) % 50, score_from=1, top_k=1)
    scoring.tag = tag  # the recording engine reports tags
    return scoring


async def run_until_blocked(scheduler: Scheduler, engine: RecordingEngine, submissions):
    """Submit a blocker job, then `submissions` (tenant, session, tag, tokens) while the engine is held,
    then release it: the queue holds everything at once, so the order is the scheduler's alone."""
    scheduler.start()
    blocker = asyncio.ensure_future(scheduler.submit("s", job("blocker", 4), "blocker"))
    await asyncio.to_thread(engine.entered.wait, 30)
    tasks = [
        asyncio.ensure_future(scheduler.submit(session, job(tag, tokens), tenant))
        for tenant, session, tag, tokens in submissions
    ]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(blocker, *tasks)
    await scheduler.stop()
    return [tag for batch in engine.batches[1:] for tag in batch]


def test_a_flooding_tenant_cannot_starve_a_light_one():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=4, quantum_tokens=64))
    flood = [("heavy", "h", f"h{i}", 32) for i in range(200)]
    light = [("light", "l", f"l{i}", 32) for i in range(3)]
    order = asyncio.run(run_until_blocked(scheduler, engine, flood + light))
    # The light tenant arrived after 200 heavy jobs, yet it is served first (it was idle:
    # new tenants first), then it alternates with the heavy one, a quantum (two jobs) each.
    positions = [order.index(f"l{i}") for i in range(3)]
    assert positions == [0, 1, 4], order[:12]
    assert len(order) == 203


def test_fair_share_is_by_tokens_not_by_requests():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=8, quantum_tokens=128))
    long = [("long", "a", f"L{i}", 128) for i in range(20)]  # 128 tokens each
    short = [("short", "b", f"S{i}", 16) for i in range(160)]  # 16 tokens each
    order = asyncio.run(run_until_blocked(scheduler, engine, long + short))
    # While both have work, each turn gives each tenant 128 tokens: one long job or eight short ones.
    first = order[:45]
    long_tokens = 128 * sum(tag.startswith("L") for tag in first)
    short_tokens = 16 * sum(tag.startswith("S") for tag in first)
    assert abs(long_tokens - short_tokens) <= 128, (long_tokens, short_tokens)


def test_teachers_on_different_engines_run_side_by_side():
    """Each engine has its own lane: a small teacher's job does not wait for a large one's batch."""
    large, small = RecordingEngine(), RecordingEngine()
    small.gate.set()
    scheduler = Scheduler(large, SchedulerLimits(max_batch_size=8))
    other = TeacherEngine("small", small)

    async def run():
        scheduler.start()
        held = asyncio.ensure_future(scheduler.submit("s", job("held", 512), "A"))
        await asyncio.to_thread(large.entered.wait, 30)
        await asyncio.wait_for(scheduler.submit("s", job("quick", 8), "B", other), 30)
        assert not held.done()  # the large teacher's batch is still on its device
        large.gate.set()
        await held
        await scheduler.stop()

    asyncio.run(run())
    assert small.batches == [["quick"]] and large.batches == [["held"]]


class AdaptedEngine(RecordingEngine):
    """A base model hosting LoRA adapters: records the adapter in force for each batch."""

    name, vocab_size, max_sequence_length, dtype = "recording", 50, 4096, "float32"
    temperatures, supports_branches, supports_requested_ids = False, False, False

    def __init__(self) -> None:
        super().__init__()
        self.adapters: list[str | None] = []

    def score_adapted(self, jobs, adapter):
        self.adapters.append(adapter)
        return self.score(jobs)


def test_teachers_over_one_base_get_batches_of_their_own_and_tenants_stay_fair():
    engine = AdaptedEngine()
    base, adapter = AdapterTeacher(engine, None, "base"), AdapterTeacher(engine, "b", "base+b")
    scheduler = Scheduler(base, SchedulerLimits(max_batch_size=8, quantum_tokens=64))
    other = TeacherEngine("b", adapter)

    async def run():
        scheduler.start()
        blocker = asyncio.ensure_future(scheduler.submit("s", job("blocker", 4), "blocker"))
        await asyncio.to_thread(engine.entered.wait, 30)
        tasks = [asyncio.ensure_future(scheduler.submit("a", job(f"a{i}", 32), "A")) for i in range(40)]
        tasks += [asyncio.ensure_future(scheduler.submit("b", job(f"b{i}", 32), "B", other)) for i in range(40)]
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(blocker, *tasks)
        await scheduler.stop()

    asyncio.run(run())
    batches = engine.batches[1:]
    assert all(len({tag[0] for tag in batch}) == 1 for batch in batches), batches  # one teacher per batch
    assert engine.adapters[1:] == [None if batch[0][0] == "a" else "b" for batch in batches]  # ... its adapter in force
    order = [tag for batch in batches for tag in batch]
    for end in range(4, len(order), 4):  # a quantum (two jobs) each, turn by turn
        served = order[:end]
        assert abs(sum(t[0] == "a" for t in served) - sum(t[0] == "b" for t in served)) <= 2, served


class SlowEngine(RecordingEngine):
    """Takes 10 ms per token of a batch (a CPU running a real model, scaled down)."""

    def score(self, jobs):
        time.sleep(0.01 * sum(len(job.token_ids) for job in jobs))
        self.gate.set()
        return super().score(jobs)


@pytest.mark.parametrize("max_batch_seconds, sizes", [(0.05, [1] * 10), (0.0, [10])])
def test_batches_hold_what_the_engine_runs_within_the_time_bound(max_batch_seconds, sizes):
    """At 100 tokens/s a 0.05 s bound leaves room for one 4-token job per batch; unbounded, the
    ten queued jobs share one batch."""

    async def scenario():
        engine = SlowEngine()
        scheduler = Scheduler(engine, SchedulerLimits(max_batch_seconds=max_batch_seconds))
        scheduler.start()
        await scheduler.submit("s", job("warm-up", 8), "t")  # the engine's throughput, measured
        await asyncio.gather(*(scheduler.submit("s", job(f"j{i}", 4), "t") for i in range(10)))
        await scheduler.stop()
        return [len(batch) for batch in engine.batches[1:]]

    assert asyncio.run(scenario()) == sizes


def test_sessions_within_a_tenant_share_its_turns_and_tenants_not_sessions_are_the_unit():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=8, quantum_tokens=32))
    # Tenant "many" spreads its jobs over four sessions, tenant "one" uses one session:
    # per-session round robin would give "many" four times the share.
    many = [("many", f"m{s}", f"m{s}-{i}", 32) for i in range(10) for s in range(4)]
    one = [("one", "o", f"o-{i}", 32) for i in range(40)]
    order = asyncio.run(run_until_blocked(scheduler, engine, many + one))
    first = order[:40]
    assert sum(tag.startswith("o") for tag in first) == 20
    # Inside "many", its turns rotate over its sessions.
    many_order = [tag.split("-")[0] for tag in first if tag.startswith("m")]
    assert many_order[:8] == ["m0", "m1", "m2", "m3"] * 2


def test_tenant_limits_give_resource_exhausted_with_a_retry_hint():
    async def main():
        engine = RecordingEngine()
        limits = SchedulerLimits(max_tenant_in_flight=3, max_tenant_queued_tokens=100, max_request_tokens=200)
        scheduler = Scheduler(engine, limits)
        scheduler.start()
        held = [asyncio.ensure_future(scheduler.submit("s", job(f"a{i}", 20), "a")) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="3 requests in flight") as caught:
            await scheduler.submit("s", job("a3", 20), "a")
        assert caught.value.retry_after_s and 0.05 <= caught.value.retry_after_s <= 30
        # Another tenant is not affected by a's limit.
        other = asyncio.ensure_future(scheduler.submit("s", job("b0", 90), "b"))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="tokens queued") as caught:
            await scheduler.submit("s", job("b1", 20), "b")
        assert caught.value.retry_after_s
        with pytest.raises(ResourceExhausted, match="limit of 200 per request") as caught:
            await scheduler.submit("s", job("big", 201), "c")
        assert caught.value.retry_after_s is None  # a size limit: retrying cannot help
        # Cancelled requests give their quota back at once, before the engine sees them.
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        assert scheduler.load("a").in_flight == 0 and scheduler.load("a").queued_tokens == 0
        engine.gate.set()
        await other
        again = await scheduler.submit("s", job("a4", 20), "a")
        assert again.token_logprobs.shape == (19,)
        await scheduler.stop()
        return engine

    engine = asyncio.run(main())
    # a0-a2 were on the device when cancelled; b0 and a4 came after.
    assert [tag for batch in engine.batches for tag in batch] == ["a0", "a1", "a2", "b0", "a4"]


def test_drain_refuses_new_work_and_finishes_accepted_work():
    async def main():
        engine = RecordingEngine()
        scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=2))
        scheduler.start()
        accepted = [asyncio.ensure_future(scheduler.submit("s", job(f"x{i}", 8), "t")) for i in range(5)]
        await asyncio.to_thread(engine.entered.wait, 30)
        scheduler.drain()
        with pytest.raises(Unavailable, match="draining"):
            await scheduler.submit("s", job("late", 8), "t")
        assert not await scheduler.wait_idle(0.05)  # the engine is still held
        engine.gate.set()
        assert await scheduler.wait_idle(30)
        results = await asyncio.gather(*accepted)
        await scheduler.stop()
        return engine, results

    engine, results = asyncio.run(main())
    assert len(results) == 5
    assert sorted(tag for batch in engine.batches for tag in batch) == [f"x{i}" for i in range(5)]


class PoisonEngine(RecordingEngine):
    """Fails any batch holding a job tagged "bad" (as an engine fails on one malformed or too large job)."""

    def score(self, jobs):
        if any(job.tag == "bad" for job in jobs):
            self.batches.append(["failed:" + ",".join(job.tag for job in jobs)])
            raise RuntimeError("engine error on the bad job")
        return super().score(jobs)


def test_one_failing_job_does_not_fail_the_jobs_batched_with_it():
    async def scenario():
        engine = PoisonEngine()
        engine.gate.set()
        scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=8))
        engine.gate.clear()  # hold the first batch so the next three queue together
        scheduler.start()
        blocker = asyncio.ensure_future(scheduler.submit("s", job("blocker", 4), "t0"))
        await asyncio.to_thread(engine.entered.wait, 30)
        tasks = [
            asyncio.ensure_future(scheduler.submit(f"s{i}", job(tag, 8), f"t{i}"))
            for i, tag in enumerate(["good1", "bad", "good2"], start=1)
        ]
        await asyncio.sleep(0)
        engine.gate.set()
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await scheduler.stop()
        return engine.batches, results

    batches, results = asyncio.run(scenario())
    assert isinstance(results[2], RuntimeError)  # only the bad job fails
    assert all(isinstance(result, TeacherScores) for index, result in enumerate(results) if index != 2), results
    assert batches[1][0].startswith("failed:"), batches  # the three were batched together and failed ...
    assert sorted(batches[2:]) == [["failed:bad"], ["good1"], ["good2"]], batches  # ... then ran one by one


def test_a_failed_scheduler_loop_fails_queued_jobs_instead_of_leaving_them_waiting():
    async def scenario():
        engine = RecordingEngine()
        scheduler = Scheduler(engine, SchedulerLimits(max_batch_size=1))
        scheduler.start()
        first = asyncio.ensure_future(scheduler.submit("s", job("first", 4), "t"))
        await asyncio.to_thread(engine.entered.wait, 30)
        queued = asyncio.ensure_future(scheduler.submit("s", job("queued", 4), "t"))
        await asyncio.sleep(0)

        def broken_delivery(*args):
            raise RuntimeError("a bug in the scheduler loop")

        scheduler._deliver = broken_delivery  # the loop dies after the engine returns
        engine.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 30)
        await scheduler.stop()
        return results

    first, queued = asyncio.run(scenario())
    for result in (first, queued):  # the job in flight and the queued one both get an answer
        assert isinstance(result, Unavailable) and "scheduler failed" in str(result), result
