"""API keys: every call to the Teacher service names its tenant with a bearer key.

Key file (`opd-teacher serve --api-keys FILE`): one `TENANT KEY` pair per line,
separated by white space; blank lines and lines starting with '#' are ignored.
A tenant may have several keys (rotation); a key belongs to one tenant.

    # tenant   key
    team-a     3f6c0a...            (at least 16 characters; e.g. `openssl rand -hex 32`)
    team-b     9d1e77...

Clients send the metadata `authorization: Bearer <key>`. A missing or unknown key
is UNAUTHENTICATED. Health and reflection stay open, so orchestrators can probe a
server they hold no key for. Keys are kept only as SHA-256 digests and never
logged; nor is any line of the key file (errors name the line number only).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from opd.metadata import AUTHORIZATION
from teacher_server.tenancy import OPEN_TENANT

if TYPE_CHECKING:
    from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyFileError(ValueError):
    """The key file is unusable; the message never contains a key."""


@dataclass(frozen=True)
class ApiKeys:
    tenant_by_digest: dict[bytes, str]

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise KeyFileError(f"cannot read the API key file {path}: {type(error).__name__}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "the API key file") -> "ApiKeys":
        tenants: dict[bytes, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{source}, line {number}"
            if len(fields) != 2:
                raise KeyFileError(f"{where}: expected two fields, TENANT and KEY, got {len(fields)}")
            tenant, key = fields
            if not _TENANT_NAME.match(tenant):
                raise KeyFileError(f"{where}: a tenant name is 1-64 characters of letters, digits, '_', '.', '-'")
            if len(key) < MIN_KEY_LENGTH:
                raise KeyFileError(f"{where}: the key is shorter than {MIN_KEY_LENGTH} characters")
            digest = _digest(key)
            if digest in tenants:
                raise KeyFileError(f"{where}: this key is already listed on an earlier line")
            tenants[digest] = tenant
        if not tenants:
            raise KeyFileError(f"{source} lists no keys; expected lines of 'TENANT KEY'")
        return cls(tenants)

    @property
    def tenants(self) -> list[str]:
        return sorted(set(self.tenant_by_digest.values()))

    def tenant_for(self, key: str) -> str | None:
        # A dict lookup on the digest: the time taken says nothing about how close a guess was.
        return self.tenant_by_digest.get(_digest(key))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_key(metadata) -> str | None:
    """The key of an `authorization: Bearer <key>` entry, or None."""
    for name, value in metadata or ():
        if name == AUTHORIZATION:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, key = value.strip().partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
            return None
    return None


class Authenticator:
    """The tenant of a Teacher call, or why it is refused (gate.py runs it for every call).

    `keys=None` is an open server: every caller is the tenant OPEN_TENANT.
    """

    def __init__(self, keys: ApiKeys | None, metrics: TeacherMetrics | None = None) -> None:
        self.keys = keys
        self.metrics = metrics
        self._failures_logged_at = 0.0
        self._failures_unlogged = 0

    def authenticate(self, details: grpc.HandlerCallDetails) -> tuple[str, str | None]:
        """The caller's tenant, or why the call is refused."""
        if self.keys is None:
            return OPEN_TENANT, None
        return self.tenant_of(
            bearer_key(details.invocation_metadata),
            details.method,
            "no API key: send the metadata 'authorization: Bearer <key>' with every call "
            "(the trainer's --teacher-api-key-file)",
        )

    def tenant_of(self, key: str | None, method: str, missing: str) -> tuple[str, str | None]:
        """The tenant of `key` (from any front end), or why it is refused; `missing` says how to send one."""
        if self.keys is None:
            return OPEN_TENANT, None
        if key is None:
            self._failed(method, "missing")
            return "", missing
        tenant = self.keys.tenant_for(key)
        if tenant is None:
            self._failed(method, "invalid")
            return "", "invalid API key; ask the teacher's operator for a key of your tenant"
        return tenant, None

    def _failed(self, method: str, why: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failure(why)
        # A scan or a misconfigured client fails thousands of times: log at most every 10 s.
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._failures_logged_at >= 10.0:
            log.warning(
                "refused %d call(s) without a valid API key (latest: %s key, %s)", self._failures_unlogged, why, method
            )
            self._failures_logged_at, self._failures_unlogged = now, 0
