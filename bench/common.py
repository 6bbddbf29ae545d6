"""What the benchmark scripts share: machine description, timing, peak memory, models,
JSON-line workers in other processes (and other Python environments), output.

Output convention of every script: one JSON object per measurement on stdout (a line
starting with "{"), then a markdown table, and first of all the exact command that
reproduces the run and the machine it ran on (cores, load average).

Peak memory is the resident-set high-water mark (VmHWM) of the process that does the
work, never of the orchestrating script: a worker process is reset before each
configuration (`reset_peak_rss`, Linux /proc/PID/clear_refs "5"), so a row's peak is that
configuration's own, on top of what the process already held (its "idle" RSS).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from teacher_server import launch  # noqa: E402 (grpc only, no torch: the OpenMP settings below still apply)

VLLM_PYTHON = Path(os.environ.get("OPD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opd"

# OpenMP threads that wait for each other sleep instead of spinning. With the default (spin
# first), a thread whose partner has been preempted by another process burns its core at every
# parallel region: on a 2-core machine shared with other work, 2 threads ran SmolLM2-135M
# scoring 2.5x slower than with this setting, and the tiny model 10-50x slower. Set before
# torch is imported (OpenMP reads it once); every engine process of the benchmarks gets it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def engine_env(threads: int) -> dict[str, str]:
    """The environment of every engine process: same threads, same OpenMP wait policy."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
        "TOKENIZERS_PARALLELISM": "false",
    }


# ----------------------------------------------------------------------------- machine


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


def header(description: str) -> None:
    """Print what runs, the command that reproduces it and the machine, as '#' lines."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    print(f"# {description}")
    print(f"# reproduce (from the repository root): {command}")
    info = machine()
    print(
        f"# machine: {info['cpus']} CPUs, Python {info['python']}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"uptime: {info['uptime']}",
        flush=True,
    )


def footer() -> None:
    print(f"# load average at the end: {load_average()}", flush=True)


# ------------------------------------------------------------------------------ memory


def _status(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise KeyError(field)


def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM: the highest resident set size since start (or since `reset_peak_rss`), MiB."""
    return _status(pid, "VmHWM")


def rss_mib(pid: int | str = "self") -> float:
    return _status(pid, "VmRSS")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ timing


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process, all its threads, so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(function: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of `function()`."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - started, time.process_time() - cpu, result


def interleaved_best(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Best (minimum) wall and CPU seconds of each function over `repeats` rounds, the functions
    taking turns within every round, so that a load spike from other processes hits all of them
    alike and the minimum is the least disturbed run of each. A function that returns a dict with
    "seconds" (and "cpu_s") times itself, e.g. without its setup or with another process's CPU.

    Wall time is what a user waits; CPU time (all threads of the working processes) is what the
    work costs, and stays meaningful when other processes share the cores."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    best = {name: {"seconds": float("inf"), "cpu_s": float("inf")} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            elapsed, cpu, result = timed(function)
            if isinstance(result, dict) and "seconds" in result:
                elapsed, cpu = result["seconds"], result.get("cpu_s", cpu)
            best[name]["seconds"] = min(best[name]["seconds"], elapsed)
            best[name]["cpu_s"] = min(best[name]["cpu_s"], cpu)
    return best


# ------------------------------------------------------------------------------ models


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct float32 (testkit/real_model.py: converted once, offline)."""
    from testkit.real_model import missing_reason, smollm2_path

    reason = missing_reason()
    if reason:
        raise SystemExit(f"SmolLM2-135M is not available: {reason}")
    return smollm2_path()


def tiny_model(context: int = 8192) -> Path:
    """The tests' tiny Llama (testkit/tiny_model.py: 2 layers, d=64, vocabulary 96, seed 0) with its
    context raised to `context` tokens (RoPE: the weights do not depend on it); cached."""
    path = CACHE / f"bench-tiny-ctx{context}"
    if not (path / "config.json").exists():
        from testkit.tiny_model import build_tiny_model

        staging = path.with_name(path.name + f".tmp{os.getpid()}")
        build_tiny_model(staging)
        config = json.loads((staging / "config.json").read_text())
        config["max_position_embeddings"] = context
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(staging, path)
    return path


def model_path(name: str) -> Path:
    return {"smollm2": smollm2_model, "tiny": tiny_model}[name]() if name in ("smollm2", "tiny") else Path(name)


# ------------------------------------------------------------------------------ output


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=float), flush=True)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | dict[str, str]) -> str:
    """rows -> a markdown table of `columns` (a dict maps key -> heading); floats get 3 significant digits
    (integers above 1000 in full)."""
    headings = columns if isinstance(columns, dict) else {c: c for c in columns}

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headings.values()) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in headings) + " |" for row in rows]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | dict[str, str], title: str = "") -> None:
    if title:
        print(f"\n{title}\n")
    else:
        print()
    print(markdown_table(rows, columns), flush=True)


# ------------------------------------------------------------------------ worker processes


class Worker:
    """A long-lived process that answers one JSON line per JSON line sent (see `serve_worker`).

    The engine under test lives in it, so its memory is its own (peak RSS per configuration)
    and it may run in another Python environment (vLLM's)."""

    def __init__(self, command: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.log_path = log
        stderr = open(log, "w") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self._ready: dict[str, Any] | None = None

    @property
    def ready(self) -> dict[str, Any]:
        """The worker's first line (it has loaded what it needs); blocks until it comes."""
        if self._ready is None:
            self._ready = self.receive()
        return self._ready

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args[:4]} exited ({self.process.wait()}); see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker failed: {answer['error']}; see {self.log_path}")
        return answer

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        _ = self.ready  # the first line first
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve_worker(setup: Callable[[], dict[str, Any]], handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker side of `Worker`: libraries' prints go to stderr, answers to the real stdout.

    `setup()` loads the engine (its dict is the ready line, with the idle RSS added); then
    each request line is answered by `handle(request)`, whose peak RSS is measured from a
    reset high-water mark."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM and transformers print to stdout: keep it clean for the answers
    sys.stdout = sys.stderr
    try:
        ready = setup()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
        answers.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        raise
    answers.write(json.dumps({**ready, "idle_rss_mib": rss_mib(), "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        reset = reset_peak_rss()
        try:
            answer = handle(request)
        except Exception as error:  # noqa: BLE001
            answers.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
            continue
        answer.setdefault("peak_rss_mib", peak_rss_mib() if reset else None)
        answers.write(json.dumps(answer, default=float) + "\n")


# ---------------------------------------------------------------------------- teacher server


class TeacherProcess(launch.TeacherProcess):
    """The launcher's teacher (teacher_server/launch.py), started from the repository root, with its
    resident memory once SERVING (idle_rss_mib)."""

    def __init__(self, model: Path, **options: Any) -> None:
        super().__init__(model, **{"cwd": REPO, "timeout_s": 600.0, **options})
        self.idle_rss_mib = rss_mib(self.pid)


async def grpc_score(
    target: str,
    sequences: Sequence,
    start: int,
    top_k: int,
    clients: int,
    warmup: bool = False,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Score `sequences` (from position `start`) over gRPC with `clients` concurrent clients, one
    channel and session each; client i sends sequences i, i + clients, ... one after the other over
    the unary Score RPC and decodes the arrays (AsyncTeacherClient's work, without its retries).
    Returns the seconds from the first request to the last answer, the scored positions and, with
    `server_pid`, the CPU seconds of server and client together."""
    import grpc

    from opd.tensors import from_tensor, to_tensor
    from opd.v1 import teacher_pb2, teacher_pb2_grpc

    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(clients)]
    stubs = [teacher_pb2_grpc.TeacherStub(channel) for channel in channels]
    opened = teacher_pb2.OpenSessionRequest(tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True))
    sessions = [(await stub.OpenSession(opened)).session_id for stub in stubs]
    request_ids = iter(range(1, 1 << 62))

    async def score(index: int, ids) -> None:
        request = teacher_pb2.ScoreRequest(
            request_id=next(request_ids),
            session_id=sessions[index],
            tokens=to_tensor(ids),
            score_from=start,
            top_k=top_k,
        )
        reply = await stubs[index].Score(request, timeout=3600)
        from_tensor(reply.ids, name="ids", dtype="int32", ndim=2)
        from_tensor(reply.logprobs, name="logprobs", dtype="float32", ndim=2)
        from_tensor(reply.token_logprobs, name="token_logprobs", dtype="float32", ndim=1)

    async def client(index: int) -> None:
        for ids in sequences[index::clients]:
            await score(index, ids)

    try:
        if warmup:
            await score(0, sequences[0])
        server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
        started, client_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(i) for i in range(clients)))
        seconds, client_cpu = time.perf_counter() - started, time.process_time() - client_cpu
        server_cpu = cpu_seconds(server_pid) - server_cpu if server_pid else None
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    result = {"seconds": seconds, "positions": sum(len(ids) - start for ids in sequences)}
    if server_pid:
        result.update(cpu_s=server_cpu + client_cpu, server_cpu_s=server_cpu, client_cpu_s=client_cpu)
    return result
