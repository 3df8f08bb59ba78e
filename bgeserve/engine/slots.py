"""Back-pressure: a fixed number of in-flight input slots; when they are all taken, fail at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bgeserve.errors import Overloaded


class InputSlots:
    """Counts the inputs being worked on across all requests.

    A request needs one slot per input. When the slots it needs are not free, `hold` raises
    `Overloaded` immediately (HTTP 429) instead of queueing: the queue can never grow past
    `capacity` inputs, so memory and latency stay bounded under any load.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._taken = 0
        # Requests run on one event loop, but the in-process API may call from several threads.
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        """Slots currently held."""
        return self._taken

    def acquire(self, count: int) -> None:
        """Takes `count` slots or raises Overloaded without taking any."""
        if count > self.capacity:
            raise Overloaded(
                f"a request of {count} inputs can never fit in {self.capacity} concurrent input slots; "
                f"send smaller batches"
            )
        with self._lock:
            if self._taken + count > self.capacity:
                raise Overloaded(
                    f"server is at capacity ({self._taken} of {self.capacity} input slots in use); "
                    f"retry later"
                )
            self._taken += count

    def release(self, count: int) -> None:
        """Gives back slots taken by `acquire`."""
        with self._lock:
            self._taken = max(0, self._taken - count)

    @contextmanager
    def hold(self, count: int) -> Iterator[None]:
        """Holds `count` slots for the duration of the block (freed on error and cancellation too)."""
        self.acquire(count)
        try:
            yield
        finally:
            self.release(count)
