"""The teacher's identity (model name + weights hash), and clients that pin it.

A trainer that resumes for days against "the teacher" must not silently train
against different weights after an operator swapped the model behind the same
address. GetInfo returns `model` and `weights_sha256`; a client that pins them
sends the metadata `opd-teacher-pin: <model>@<weights_sha256>` with every call,
and a server serving anything else answers FAILED_PRECONDITION (never a score).
GetInfo itself is not checked: it is how a client learns what to pin. A server hosting
several teachers accepts a pin of any of them, and refuses a pinned client's sessions of
another (teachers.py).

The hash covers every regular file of a local model directory (weights, config,
tokenizer), streamed, so it is computed without loading anything twice. A hub id
that is not a local directory has no hash here (""); pinning then checks the
model name only.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from opd.metadata import PIN, UNPINNED_METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherIdentity:
    model: str
    weights_sha256: str

    @property
    def pin(self) -> str:
        return f"{self.model}@{self.weights_sha256}"


def weights_sha256(model: str) -> str:
    """SHA-256 over the relative names and contents of every file in the model directory."""
    root = Path(model)
    if not root.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


_PINNED: contextvars.ContextVar[TeacherIdentity | None] = contextvars.ContextVar("opd_pinned", default=None)


def current_pin() -> TeacherIdentity | None:
    """The teacher the current call is pinned to (None: not pinned)."""
    return _PINNED.get()


def set_current_pin(pinned: TeacherIdentity | None) -> None:
    _PINNED.set(pinned)


def pinned_teacher(
    details: grpc.HandlerCallDetails, served: tuple[TeacherIdentity, ...] | None
) -> tuple[TeacherIdentity | None, str | None]:
    """(the served teacher the call is pinned to, why the call is refused): a pin must name one of
    the teachers served (a server hosting several checks the session's own teacher later,
    teachers.py). `served` is None while the models load (the servicer answers UNAVAILABLE then)."""
    pin = next((value for name, value in details.invocation_metadata or () if name == PIN), None)
    if pin is None or details.method in UNPINNED_METHODS or served is None:
        return None, None
    pin = pin.decode("latin-1") if isinstance(pin, bytes) else pin
    for identity in served:
        if _matches(pin, identity):
            return identity, None
    log.warning("refused a call pinned to another teacher (%s)", details.method)
    serving = ", ".join(repr(identity.pin) for identity in served)
    return None, (
        f"this server serves {serving} but the client pinned {pin!r}: the teacher was swapped. "
        "Refusing to score with other weights; point the client at the pinned teacher, or re-pin deliberately"
    )


def _matches(pin: str, served: TeacherIdentity) -> bool:
    model, _, sha = pin.rpartition("@")
    if not model:  # a bare name without '@'
        model, sha = sha, ""
    return model == served.model and (sha == served.weights_sha256)
