import grpc
import pytest

from protocol.channel import with_retry


class FakeError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


def flaky(codes):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(codes):
            raise FakeError(codes[len(calls) - 1])
        return "ok"
    return call, calls


def test_retries_unavailable_with_capped_jittered_backoff():
    sleeps = []
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED] * 2)
    assert with_retry(call, attempts=6, base_s=1.0, cap_s=3.0, sleep=sleeps.append) == "ok"
    assert len(calls) == 5 and len(sleeps) == 4
    assert all(0 <= s <= min(3.0, 2**i) for i, s in enumerate(sleeps))


def test_other_codes_are_not_retried():
    call, calls = flaky([grpc.StatusCode.PERMISSION_DENIED])
    with pytest.raises(FakeError):
        with_retry(call, sleep=lambda s: None)
    assert len(calls) == 1


def test_gives_up_after_attempts():
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(FakeError):
        with_retry(call, attempts=3, sleep=lambda s: None)
    assert len(calls) == 3
