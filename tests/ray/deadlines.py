"""Time bounds for the Ray tests: a hung Ray call must fail the test, never stall `make test`."""

from __future__ import annotations

import faulthandler
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

# Seconds one test may take.
TEST_DEADLINE_S = 120
# Past a deadline, this much more and the whole run stops, printing every thread's stack.
HARD_STOP_GRACE_S = 60


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fails with TimeoutError after `seconds` (SIGALRM); if even that cannot interrupt a hung call,
    stops the run `HARD_STOP_GRACE_S` later with every thread's stack."""

    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + HARD_STOP_GRACE_S, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Polls `condition` until it is truthy and returns its value; fails naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
