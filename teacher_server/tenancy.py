"""Tenants: who is calling, and which sessions each tenant may see.

The tenant of the current RPC lives in a context variable set by the auth
interceptor (auth.py) inside the RPC's task, so the servicer and every task it
starts see it without threading it through each call. A server without API keys
serves everyone as one tenant, OPEN_TENANT.

Sessions are content-addressed and shared (sessions.py): two tenants with the
same tokenizer get the same session id and the same tables. Ownership is kept
apart from the tables: a tenant may use or close only a session it opened
itself. Anything else is NOT_FOUND, with the same message as an unknown id, so
a tenant learns nothing about other tenants' sessions (not even that they
exist), and a well-behaved client simply opens its own.
"""

from __future__ import annotations

import contextvars
import threading
from collections import defaultdict

from teacher_server.errors import NotFound, ResourceExhausted

OPEN_TENANT = "open"
# Memory the tables of one tenant's sessions may hold (--max-tenant-table-mib).
MAX_TENANT_TABLE_BYTES = 2 << 30

_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("opd_tenant", default=OPEN_TENANT)


def current_tenant() -> str:
    return _TENANT.get()


def set_current_tenant(tenant: str) -> None:
    _TENANT.set(tenant)


def unknown_session(session_id: str) -> NotFound:
    return NotFound(
        f"unknown session_id {session_id!r}: sessions live as long as the teacher process; "
        "call OpenSession again (the same tokenizer gives the same id)"
    )


class SessionOwners:
    """Which tenants opened which sessions, with a cap on each tenant's sessions and on the memory
    their tables hold (a session shared by several tenants counts in full for each).

    OpenSession grants from a worker thread (it may build alignment tables) while the
    other RPCs check and release on the event loop: one lock keeps the maps consistent.
    """

    def __init__(self, max_sessions_per_tenant: int = 64, max_tenant_table_bytes: int = MAX_TENANT_TABLE_BYTES) -> None:
        self.max_sessions_per_tenant = max_sessions_per_tenant
        self.max_tenant_table_bytes = max_tenant_table_bytes
        self._by_tenant: dict[str, set[str]] = defaultdict(set)
        self._owners: dict[str, set[str]] = defaultdict(set)
        self._bytes: dict[str, int] = {}  # session id -> its tables' bytes
        self._lock = threading.Lock()

    def admit(self, tenant: str, session_id: str) -> None:
        """Before any work on a session: may `tenant` open it (it holds it already, or it is below
        its caps)?"""
        with self._lock:
            if session_id not in self._by_tenant.get(tenant, ()):
                self._check(tenant, 1, 0)

    def grant(self, tenant: str, session_id: str, table_bytes: int = 0) -> None:
        """Record that `tenant` opened `session_id` (again: a no-op)."""
        with self._lock:
            if session_id in self._by_tenant[tenant]:
                return
            self._check(tenant, 1, table_bytes)
            self._by_tenant[tenant].add(session_id)
            self._owners[session_id].add(tenant)
            self._bytes[session_id] = table_bytes

    def _check(self, tenant: str, adding: int, adding_bytes: int) -> None:
        # Every session holds tables in memory: without these caps one tenant opening sessions
        # with ever new tokenizers would grow the server without bound.
        owned = self._by_tenant.get(tenant, set())
        if len(owned) + adding > self.max_sessions_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} already has {len(owned)} open sessions, the limit is "
                f"{self.max_sessions_per_tenant}; close sessions it no longer uses (CloseSession)"
            )
        held = sum(self._bytes.get(session_id, 0) for session_id in owned)
        if held + adding_bytes > self.max_tenant_table_bytes or held >= self.max_tenant_table_bytes:
            raise ResourceExhausted(
                f"tenant {tenant!r}'s sessions would hold {(held + adding_bytes) >> 20} MiB of tables, over the "
                f"limit of {self.max_tenant_table_bytes >> 20} MiB per tenant; close sessions it no longer uses "
                "(CloseSession)"
            )

    def check(self, tenant: str, session_id: str) -> None:
        with self._lock:
            if session_id not in self._by_tenant.get(tenant, ()):
                raise unknown_session(session_id)

    def release(self, tenant: str, session_id: str) -> bool:
        """Forget that `tenant` opened `session_id`; True when no tenant holds it any more."""
        with self._lock:
            if session_id not in self._by_tenant.get(tenant, ()):
                raise unknown_session(session_id)
            self._by_tenant[tenant].discard(session_id)
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]
            owners = self._owners[session_id]
            owners.discard(tenant)
            if owners:
                return False
            del self._owners[session_id]
            self._bytes.pop(session_id, None)
            return True

    def has_owner(self, session_id: str) -> bool:
        with self._lock:
            return bool(self._owners.get(session_id))

    def count(self) -> int:
        with self._lock:
            return len(self._owners)
