"""Metadata keys of the opd.v1 Teacher service: one place for the server and its clients."""

AUTHORIZATION = "authorization"  # "Bearer <key>" (teacher_server/auth.py)
PIN = "opd-teacher-pin"  # "<model>@<weights_sha256>" (teacher_server/identity.py)
RETRY_AFTER_MS = "retry-after-ms"  # trailer of RESOURCE_EXHAUSTED: milliseconds to wait (teacher_server/errors.py)
PROTECTED_PREFIX = "/opd.v1.Teacher/"  # the methods that need a key; health and reflection stay open
UNPINNED_METHODS = ("/opd.v1.Teacher/GetInfo",)  # how a client learns what to pin
