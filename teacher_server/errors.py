"""Domain errors of the teacher service, each tied to the gRPC status a client sees.

Code below the servicer raises these; `StatusInterceptor` (interceptor.py) and the
stream handler turn them into status codes with the message unchanged, so every
message must say what to do about it.
"""

from __future__ import annotations

import grpc


class TeacherError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(TeacherError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TeacherError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(TeacherError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TeacherError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TeacherError):
    code = grpc.StatusCode.UNAVAILABLE
