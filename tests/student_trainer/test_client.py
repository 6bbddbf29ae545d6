"""Which teacher failures the client retries (student_trainer/client.py `_recover`).

End-to-end retries (teacher down, restarted, draining, SIGKILLed mid-run) are tested against real
servers in tests/teacher_server/test_server.py and tests/student_trainer/test_faults.py; a broken
connection that grpc's own client reports as INTERNAL is too timing-dependent to provoke there
on demand, so its classification is checked here.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from student_trainer.client import LOCAL_CORE_INTERNAL, AsyncTeacherClient, TeacherRequestError, _Failure


def recover(failure: _Failure) -> float:
    """Seconds the endpoint rests after `failure` (raises if the client gives up)."""

    async def run() -> float:
        client = AsyncTeacherClient("127.0.0.1:1")
        try:
            endpoint = client.endpoints[0]
            client._recover(endpoint, failure, attempt=0, started=time.monotonic())
            return endpoint.resting_until - time.monotonic()
        finally:
            await client.close()

    return asyncio.run(run())


def test_a_connection_broken_inside_the_grpc_client_is_retried():
    assert recover(_Failure(grpc.StatusCode.INTERNAL, LOCAL_CORE_INTERNAL)) > 0
    assert recover(_Failure(grpc.StatusCode.UNAVAILABLE, "connection refused")) > 0


def test_an_internal_error_of_the_teacher_is_not_retried():
    # The teacher's own INTERNAL names the exception: a bug to report, not a failure to wait out.
    message = "internal error (RuntimeError: boom); see the teacher's log"
    with pytest.raises(TeacherRequestError) as caught:
        recover(_Failure(grpc.StatusCode.INTERNAL, message))
    assert caught.value.message == message
