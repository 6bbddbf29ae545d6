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
    """Which tenants opened which sessions, with a cap on sessions per tenant.

    OpenSession grants from a worker thread (it may build alignment tables) while the
    other RPCs check and release on the event loop: one lock keeps the two maps consistent.
    """

    def __init__(self, max_sessions_per_tenant: int = 64) -> None:
        self.max_sessions_per_tenant = max_sessions_per_tenant
        self._by_tenant: dict[str, set[str]] = defaultdict(set)
        self._owners: dict[str, set[str]] = defaultdict(set)
        self._lock = threading.Lock()

    def grant(self, tenant: str, session_id: str) -> None:
        """Record that `tenant` opened `session_id` (again: a no-op)."""
        with self._lock:
            owned = self._by_tenant[tenant]
            if session_id in owned:
                return
            if len(owned) >= self.max_sessions_per_tenant:
                # Every session holds tables in memory: without this cap one tenant opening
                # sessions with ever new tokenizers would grow the server without bound.
                raise ResourceExhausted(
                    f"tenant {tenant!r} already has {len(owned)} open sessions, the limit is "
                    f"{self.max_sessions_per_tenant}; close sessions it no longer uses (CloseSession)"
                )
            owned.add(session_id)
            self._owners[session_id].add(tenant)

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
            return True

    def has_owner(self, session_id: str) -> bool:
        with self._lock:
            return bool(self._owners.get(session_id))

    def count(self) -> int:
        with self._lock:
            return len(self._owners)
