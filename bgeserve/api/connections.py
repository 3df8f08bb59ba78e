"""Connection hygiene below the app: a deadline for each request head, and a hard cap on open connections.

uvicorn's h11 protocol closes idle keep-alive connections, but a connection that never finishes its
request head (or never sends a byte) is kept forever, and every connection past `limit_concurrency`
is still read and kept open to be told 503. Both hold a file descriptor each until the process runs
out; this protocol drops them early instead. Body deadlines are the app's (`middleware.RequestBody`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("bgeserve.api")

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: 31\r\n\r\ntoo many open connections; retry"
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus `head_timeout` and a refusal of connections past `limit_concurrency`."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            # Past the cap even the 503 of uvicorn would keep a descriptor for a while: answer and close now.
            transport.write(_REFUSED)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused or timed out: nothing more is read
        super().data_received(data)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        """Runs while a request head is awaited and has begun (or the connection is new); else stops.

        An idle keep-alive connection between requests is uvicorn's `timeout_keep_alive`'s to close.
        """
        if self.transport is None or self.transport.is_closing():
            self._cancel_head_timer()
            return
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        started = self.cycle is None or bool(self.conn.trailing_data[0])
        if waiting and started:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
        else:
            self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request head did not arrive within %g s (--read-timeout)",
                     self.head_timeout)
            self.transport.close()


def guarded_protocol(head_timeout: float) -> functools.partial[GuardedH11Protocol]:
    """The protocol factory to pass as uvicorn's `http`."""
    return functools.partial(GuardedH11Protocol, head_timeout=head_timeout)
