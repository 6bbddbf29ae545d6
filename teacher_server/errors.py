"""Domain errors of the teacher service, each tied to the gRPC status a client sees.

Code below the servicer raises these; `StatusInterceptor` (interceptor.py) and the
stream handler turn them into status codes with the message unchanged, so every
message must say what to do about it.
"""

from __future__ import annotations

import grpc

# Trailing metadata key of a unary RESOURCE_EXHAUSTED: milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"


class TeacherError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra trailing metadata for the client (a retry hint); none by default."""
        return ()


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

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)

    @property
    def retry_after_ms(self) -> int:
        return max(1, round(1000 * (self.retry_after_s or 0.0)))


class Unavailable(TeacherError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TeacherError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TeacherError):
    code = grpc.StatusCode.PERMISSION_DENIED
