"""A worker process for work on a tenant's untrusted input: limits per call, and every failure
comes back as an error with a message.

The serving process never parses, encodes with or builds tables from a student's tokenizer
itself. The tokenizers library holds the interpreter lock while it works, so a tokenizer made to
be slow (a backtracking pre-tokenizer regex) would stop the event loop: health checks and every
tenant's requests with it. Its panics are BaseExceptions that slip past `except Exception`, and a
vocabulary with one huge id asks for gigabytes. In a worker, each call runs under a CPU-time limit
(a profiling timer, ITIMER_PROF, which may be set again for a phase of the call) and an
address-space limit (RLIMIT_AS), and the caller waits at most a wall-clock limit; a worker past a
limit dies or is killed, the call fails with SandboxFailure naming the limit, and the next call
starts a new worker.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from teacher_server.errors import TeacherError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one call may use in the worker."""

    cpu_s: float  # CPU time of the call
    wall_s: float  # time the caller waits for it (a worker stopped by the kernel never answers)
    memory_bytes: int  # address space the worker may grow by once set up (the Sandbox's; not per call)


class SandboxFailure(Exception):
    """The call failed in the worker (an error, a panic) or ran past a limit; the message says which."""


class SandboxBusy(Exception):
    """Too many calls are waiting for the worker already."""


class Sandbox:
    """One worker process, one call at a time, started on first use and after every failure.

    `setup(*setup_args)` runs in each new worker before its first call (state the calls share,
    e.g. the teacher's own tokenizer tables), outside the per-call limits.
    """

    def __init__(
        self,
        name: str,
        limits: Limits,
        setup: Callable[..., None] | None = None,
        setup_args: tuple = (),
        max_waiting: int = 16,
        setup_timeout_s: float = 600.0,
    ) -> None:
        self.name = name
        self.limits = limits
        self.max_waiting = max_waiting
        self._setup, self._setup_args, self._setup_timeout_s = setup, setup_args, setup_timeout_s
        self._lock = threading.Lock()  # guards the waiting count
        self._turn = threading.Lock()  # the worker, one call at a time
        self._waiting = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection = None

    def call(self, function: Callable[..., Any], *args: Any, limits: Limits | None = None) -> Any:
        """`function(*args)` in the worker (both picklable). The domain errors it raises
        (errors.TeacherError) come back as they are; anything else as SandboxFailure."""
        limits = limits or self.limits
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise SandboxBusy(f"{self._waiting} calls are already waiting for the {self.name} worker")
            self._waiting += 1
        try:
            with self._turn:
                return self._run(function, args, limits)
        finally:
            with self._lock:
                self._waiting -= 1

    def close(self) -> None:
        with self._turn:
            self._stop()

    def _run(self, function: Callable[..., Any], args: tuple, limits: Limits) -> Any:
        connection = self._started()
        connection.send((function, args, limits.cpu_s))
        deadline, phase, cpu_s = time.monotonic() + limits.wall_s, "", limits.cpu_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not connection.poll(remaining):
                self._stop()
                raise self._failure(f"{_during(phase)}it took longer than {limits.wall_s:g} s")
            try:
                kind, value = connection.recv()
            except (EOFError, OSError):
                raise self._failure(_during(phase) + self._death(cpu_s)) from None
            if kind == "phase":
                phase, cpu_s = value[0], value[1] or cpu_s
                continue
            self._recycle_if_grown()
            if kind == "ok":
                return value
            if kind == "raise":
                raise value
            raise SandboxFailure(_during(phase) + value)

    def _recycle_if_grown(self) -> None:
        """A worker whose resident memory grew past half its limit (what libraries keep from call
        to call) is replaced before the next call, rather than failing one at the limit."""
        try:
            with open(f"/proc/{self._process.pid}/statm") as statm:
                resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return
        if resident > self.limits.memory_bytes // 2:
            self._stop()

    def _started(self):
        if self._process is not None and self._process.is_alive():
            return self._connection
        self._stop()
        context = multiprocessing.get_context("spawn")  # not fork: the server has threads and a gRPC core
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(child, self.limits.memory_bytes, self._setup, self._setup_args),
            name=f"opd-{self.name}",
            daemon=True,
        )
        process.start()
        child.close()
        weakref.finalize(self, _kill, process)  # a server (or test) that drops its sandbox stops its worker
        self._process, self._connection = process, parent
        if not parent.poll(self._setup_timeout_s):
            self._stop()
            raise SandboxFailure(f"the {self.name} worker did not start within {self._setup_timeout_s:g} s")
        try:
            kind, value = parent.recv()
        except (EOFError, OSError):
            kind, value = "fail", f"exit code {process.exitcode}"
        if kind != "ready":
            self._stop()
            raise RuntimeError(f"the {self.name} worker failed to set up: {value}")
        return parent

    def _failure(self, why: str) -> SandboxFailure:
        log.warning("the %s worker was stopped, a new one takes the next call: %s", self.name, why)
        return SandboxFailure(why)

    def _death(self, cpu_s: float) -> str:
        """Why the worker died, as a person can act on it."""
        process = self._process
        process.join(5)
        code = process.exitcode
        self._stop()
        if code == -signal.SIGPROF:
            return f"it used more than {cpu_s:g} s of CPU time"
        if code in (-signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV):
            return (
                f"it ran out of memory (the limit is {self.limits.memory_bytes >> 20} MiB) or crashed (signal {-code})"
            )
        return f"the worker stopped (exit code {code})"

    def _stop(self) -> None:
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if process is not None:
            _kill(process)


def _kill(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.kill()
        process.join(5)


def _during(phase: str) -> str:
    return f"while {phase}, " if phase else ""


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps what is freed in its arenas (one per
    thread that allocated), so a server whose tenants open and close sessions (tables arrive in
    OpenSession's threads), or a worker that reads one tokenizer after another, kept most of it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


# ---------------------------------------------------------------------------- in the worker

_connection = None


def phase(description: str, cpu_s: float | None = None) -> None:
    """In a call: name what it does now (failures say "while <description>"), optionally under a
    tighter CPU limit than the call's, counted from here."""
    if _connection is None:
        return  # run outside a worker (tests, benchmarks): no limits to set
    _connection.send(("phase", (description, cpu_s)))
    if cpu_s is not None:
        _limit_cpu(cpu_s)


def _limit_cpu(cpu_s: float) -> None:
    """SIGPROF, whose default action ends the process, after `cpu_s` more seconds of the process's
    CPU time: a relative limit, on the clock the kernel checks. (RLIMIT_CPU takes an absolute one,
    which would be computed from getrusage's times; those drift from the kernel's tick-sampled
    count by seconds over a long-lived worker's minutes of CPU, more than a 2 s phase allows.)"""
    signal.setitimer(signal.ITIMER_PROF, cpu_s)


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _serve(connection, memory_bytes: int, setup: Callable[..., None] | None, setup_args: tuple) -> None:
    global _connection
    # One core's worth of work: the serving process keeps the rest.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C stops the server, which stops this
    try:
        if setup is not None:
            setup(*setup_args)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory_bytes, hard))
    except BaseException as error:
        connection.send(("fail", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", None))
    _connection = connection
    while True:
        try:
            function, args, cpu_s = connection.recv()
        except (EOFError, OSError):
            return  # the server closed the pipe
        _limit_cpu(cpu_s)
        try:
            reply = ("ok", function(*args))
        except TeacherError as error:  # refused on purpose: its own status and message
            reply = ("raise", error)
        except MemoryError:
            reply = ("fail", f"it ran out of memory (the limit is {memory_bytes >> 20} MiB)")
        except BaseException as error:  # a panic in Rust code arrives as a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            reply = ("fail", f"{type(error).__name__}: {error}"[:2000])
        try:
            connection.send(reply)
        except Exception as error:  # a result that cannot be pickled (a bug) still gets an answer
            connection.send(("fail", f"the result could not be sent back: {type(error).__name__}: {error}"))
        del reply
        return_freed_memory()
        signal.setitimer(signal.ITIMER_PROF, 0)  # idle between calls
