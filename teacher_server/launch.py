"""`opd-teacher serve` in a subprocess, ready when the constructor returns: the one launcher of
the demo, the study, the benchmarks and the tests.

It imports neither torch nor the server, so a caller that sets OpenMP variables first (bench/)
keeps them for itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now (the OS's pick; another process may still take it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class TeacherProcess:
    """`python -m teacher_server.cli serve --model MODEL` on 127.0.0.1, SERVING once constructed.

    `model` None: the teachers are in `extra` (--teacher / --teachers); `extra`: further flags; `env`: variables added to this process's environment; `log`: file
    for the teacher's output (None: discarded); `python`: the interpreter (another venv's).
    """

    def __init__(
        self,
        model: Path | str | None,
        *,
        port: int | None = None,
        extra: Iterable[str] = (),
        env: dict[str, str] | None = None,
        log: Path | None = None,
        python: str = sys.executable,
        cwd: Path | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.port = port or free_port()
        self.target = f"{HOST}:{self.port}"
        self.log_path = log
        command = [
            python,
            "-m",
            "teacher_server.cli",
            "serve",
            *(("--model", str(model)) if model is not None else ()),
            "--host",
            HOST,
            "--port",
            str(self.port),
            *extra,
        ]
        self._output = open(log, "w") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command, stdout=self._output, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})}
        )
        try:
            wait_until_serving(self.target, self.process, timeout_s, log)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def close(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after timeout_s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._output is not subprocess.DEVNULL:
            self._output.close()

    def __enter__(self) -> "TeacherProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def threads(count: int) -> dict[str, str]:
    """Environment for a teacher with `count` intra-op threads (on a small machine shared with a
    trainer, more threads made every teacher call many times slower)."""
    return {"OMP_NUM_THREADS": str(count), "MKL_NUM_THREADS": str(count)}


def wait_until_serving(target: str, process: subprocess.Popen, timeout_s: float, log_path: Path | None) -> None:
    """Poll the standard health service until SERVING; fail early if the process exits."""
    where = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the teacher exited with code {process.returncode}{where}{_tail(log_path)}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the teacher at {target} was not SERVING after {timeout_s:.0f} s{where}{_tail(log_path)}")


def _tail(log_path: Path | None, lines: int = 30) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    return "; its last lines:\n" + "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
