"""The request queue: tokenised inputs of many requests, cut into token-budget batches for the replicas."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

from bgeserve.core import ItemOutput, OutputRequest
from bgeserve.engine.batching import plan_batches
from bgeserve.errors import ShuttingDown


@dataclass(frozen=True)
class ItemResult:
    """One input's outputs plus where its time went."""

    output: ItemOutput
    queue_seconds: float
    inference_seconds: float


@dataclass(eq=False)
class WorkItem:
    """One tokenised input waiting for a forward pass; its result goes back through `future`."""

    ids: list[int]
    want: OutputRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ItemResult]
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set by the request when it gives up (timeout, client gone): the batcher then skips the item.
    cancelled: bool = False

    def resolve(self, output: ItemOutput, started: float, finished: float) -> None:
        """Hands the output back to the waiting request (called from a worker thread)."""
        result = ItemResult(output, started - self.enqueued_at, finished - started)
        self._deliver(_set_result, result)

    def fail(self, error: BaseException) -> None:
        """Hands an error back to the waiting request (called from a worker thread)."""
        self._deliver(_set_exception, error)

    def _deliver(self, setter, value) -> None:
        # A closed loop means the server is gone and nobody waits for this result.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(setter, self.future, value)


def _set_result(future: asyncio.Future, value: ItemResult) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class TokenBudgetBatcher:
    """Collects work items from all requests and cuts batches for the replica threads.

    A batch holds items that asked for the same outputs. It is cut when the queue holds a full token
    budget (padded tokens: items x longest) or `max_batch_requests` items, or once the oldest item has
    waited `wait_seconds`; whatever is waiting when a replica comes free is taken at once. Items are
    grouped longest first (`plan_batches`) so padding stays small, and the batch taken is always the
    one holding the oldest item, so a stream of long inputs cannot starve a short one.
    """

    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
        wait_seconds: float = 0.0,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests or max_batch_tokens
        self.wait_seconds = max(0.0, wait_seconds)
        self._pending: list[WorkItem] = []
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, items: list[WorkItem]) -> None:
        """Adds items of one request (together, so they can share a batch), behind everything queued."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down and takes no new work")
            now = time.monotonic()
            for item in items:
                item.enqueued_at = now  # a request streaming through its window queues items late
            self._pending.extend(items)
            self._cond.notify_all()

    def close(self) -> None:
        """Takes no more items; replicas drain what is queued, then `next_batch` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next_batch(self) -> list[WorkItem] | None:
        """Blocks until a batch is due and returns it; None once closed and drained."""
        with self._cond:
            while True:
                self._pending = [item for item in self._pending if not item.cancelled]
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if self._closed or self._full():
                    return self._cut()
                due = self._pending[0].enqueued_at + self.wait_seconds
                remaining = due - time.monotonic()
                if remaining <= 0:
                    return self._cut()
                self._cond.wait(remaining)

    def _same_outputs_as_oldest(self) -> list[WorkItem]:
        want = self._pending[0].want
        return [item for item in self._pending if item.want == want]

    def _full(self) -> bool:
        group = self._same_outputs_as_oldest()
        if len(group) >= self.max_batch_requests:
            return True
        # Padded cost if everything waiting ran together; enough to fill the budget means cut now.
        longest = max(len(item.ids) for item in group)
        return len(group) * longest >= self.max_batch_tokens

    def _cut(self) -> list[WorkItem]:
        group = self._same_outputs_as_oldest()
        plans = plan_batches(
            [len(item.ids) for item in group], self.max_batch_tokens, self.max_batch_requests
        )
        # Index 0 of the group is the oldest item; its batch goes first.
        chosen = next(plan for plan in plans if 0 in plan)
        batch = [group[i] for i in chosen]
        taken = set(map(id, batch))
        self._pending = [item for item in self._pending if id(item) not in taken]
        return batch
