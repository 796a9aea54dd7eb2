"""The one retry policy: capped exponential backoff with jitter, retrying only what may heal.

Every retry in edgetune (each RPC in :func:`protocol.channel.with_retry`, a whole training step in the
edge's recipe) goes through :func:`retry`; callers say what is retryable and what to do before the next
attempt, never how long to wait.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Attempt ``n`` (from 0) that fails waits ``d/2 + uniform(0, d/2)`` seconds, ``d = min(cap_s, base_s * 2**n)``.

    "Equal jitter": clients that failed together spread out, and none retries sooner than half the step.
    """

    attempts: int = 6
    base_s: float = 0.25
    cap_s: float = 8.0

    def delay(self, attempt: int) -> float:
        step = min(self.cap_s, self.base_s * 2**attempt)
        return step / 2 + random.uniform(0, step / 2)


def retry(call: Callable[[], T], retryable: Callable[[BaseException], bool], backoff: Backoff = Backoff(),
          on_retry: Callable[[BaseException, float], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """Runs ``call`` up to ``backoff.attempts`` times while it raises an exception ``retryable`` accepts.

    ``on_retry(error, delay)`` runs before each wait (report, reset state); the last error is re-raised.
    """
    for attempt in range(backoff.attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - filtered by ``retryable``, re-raised otherwise
            if not retryable(err) or attempt == backoff.attempts - 1:
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(err, delay)
            sleep(delay)
    raise AssertionError("unreachable")
