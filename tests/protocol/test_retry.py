import grpc
import pytest

from protocol.channel import with_retry


class FakeError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "connection refused"


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


def test_tls_handshake_failures_are_not_retried():
    class Handshake(FakeError):
        def details(self):
            return "failed to connect to all addresses; last error: Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"

    calls = []

    def call():
        calls.append(1)
        raise Handshake(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(Handshake):
        with_retry(call, sleep=lambda s: None)
    assert len(calls) == 1


def test_the_one_policy_serves_any_caller():
    """protocol.retry.retry: the caller's predicate decides, on_retry runs before each wait, the last error
    is raised."""
    from protocol.retry import Backoff, retry

    seen, sleeps = [], []
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 2)
    assert retry(call, lambda e: isinstance(e, FakeError), Backoff(5, 1.0, 1.5),
                 lambda e, d: seen.append(d), sleeps.append) == "ok"
    assert seen == sleeps and len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 0.75 <= sleeps[1] <= 1.5  # half the capped step, plus jitter
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 9)
    with pytest.raises(FakeError):
        retry(call, lambda e: True, Backoff(4), sleep=lambda s: None)
    assert len(calls) == 4


def test_channel_and_diagnose_import_in_either_order():
    """No import circle: each of the two modules imports on its own in a fresh interpreter."""
    import subprocess
    import sys

    for first in ("protocol.diagnose", "protocol.channel"):
        probe = "print(sorted(m for m in sys.modules if m in ('protocol.channel', 'protocol.diagnose')))"
        done = subprocess.run([sys.executable, "-c", f"import {first}; import sys; {probe}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"[{first!r}]"  # importing one does not drag in the other
