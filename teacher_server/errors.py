"""Domain errors of the teacher service, each tied to the gRPC status a client sees.

Code below the servicer raises these; `StatusInterceptor` (interceptor.py) and the
stream handler turn them into status codes with the message unchanged, so every
message must say what to do about it.
"""

from __future__ import annotations

import grpc


class TeacherError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retry_after_ms: int = 0  # a retry hint for the client; 0: none


class InvalidArgument(TeacherError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TeacherError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(TeacherError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TeacherError):
    """A limit was hit. `retry_after_s` (when known) tells the client how long to back off:
    it travels as the `retry-after-ms` trailer of a unary call and as Error.retry_after_ms
    in a stream. Only errors carrying it are worth retrying: a message over the size limit
    (RESOURCE_EXHAUSTED from gRPC itself) never will be accepted."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.retry_after_ms = 0 if retry_after_s is None else max(1, round(1000 * retry_after_s))


class Unavailable(TeacherError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TeacherError):
    code = grpc.StatusCode.UNAUTHENTICATED
