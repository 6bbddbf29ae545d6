"""Where the teacher client connects: its addresses, TLS, one channel per address, and the
backoff and retry hints of its retries (client.py)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from opd.metadata import RETRY_AFTER_MS
from opd.v1 import teacher_pb2_grpc

# round_robin over every address a target resolves to (a DNS name of several replicas);
# with one address it behaves like the default pick_first.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1000  # in practice max_elapsed_s decides
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_elapsed_s: float = 900.0  # a teacher restart of a big model takes minutes; a step waits that long

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.5, 1.0) * min(self.max_backoff_s, self.initial_backoff_s * 2**attempt)


@dataclass(frozen=True)
class TlsOptions:
    """PEM files. `root_certificates`: the CA that signed the teacher's certificate (None:
    the system roots); `certificate_chain` + `private_key`: the client's own, for mTLS;
    `server_name`: the name to check the certificate against, if not the target's host."""

    root_certificates: str | None = None
    certificate_chain: str | None = None
    private_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_certificates),
            private_key=read(self.private_key),
            certificate_chain=read(self.certificate_chain),
        )


def split_targets(target: str | Sequence[str]) -> list[str]:
    """Endpoints of `target`: a list, or a comma-separated string. gRPC's own address lists
    (`ipv4:10.0.0.1:50051,10.0.0.2:50051`, `ipv6:...`) stay one load-balanced endpoint."""
    if isinstance(target, str) and target.startswith(("ipv4:", "ipv6:")):
        return [target]
    targets = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no teacher address given")
    return targets


class Endpoint:
    """One teacher address: its channel, and whether our session is open there."""

    def __init__(self, target: str, options: list, tls: TlsOptions | None) -> None:
        self.target = target
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            extra = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=options + extra)
        self.stub = teacher_pb2_grpc.TeacherStub(self.channel)
        self.session_open = False
        self.open_calls = 1  # OpenSession calls per (re-)open; grows while NOT_FOUND persists
        self.resting_until = 0.0  # monotonic time before which this endpoint gets no new work


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_MS:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def is_loopback(target: str) -> bool:
    host = target.rpartition("/")[2].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
