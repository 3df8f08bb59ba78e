"""TokenBudgetBatcher: which items a batch takes, and when it is cut."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bgeserve.core import OutputRequest
from bgeserve.engine.queue import TokenBudgetBatcher, WorkItem
from bgeserve.engine.slots import InputSlots
from bgeserve.errors import Overloaded, ShuttingDown

DENSE = OutputRequest()


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def item(loop, length: int, want: OutputRequest = DENSE, at: float | None = None) -> WorkItem:
    made = WorkItem(list(range(length)), want, loop, loop.create_future())
    if at is not None:
        made.enqueued_at = at
    return made


def test_batch_respects_padded_budget_longest_first(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=100)
    items = [item(loop, n) for n in (10, 50, 12, 48, 11)]
    batcher.put(items)
    first = batcher.next_batch()
    # The oldest item (10 tokens) goes in the first batch, with the other short ones: 3 x 12 <= 100.
    assert [len(i.ids) for i in first] == [12, 11, 10]
    second = batcher.next_batch()
    assert [len(i.ids) for i in second] == [50, 48]
    assert len(batcher) == 0


def test_request_cap_and_single_oversized_item(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=100, max_batch_requests=2)
    batcher.put([item(loop, 5) for _ in range(5)] + [item(loop, 500)])
    sizes = []
    while len(batcher):
        sizes.append([len(i.ids) for i in batcher.next_batch()])
    assert [500] in sizes
    assert all(len(batch) <= 2 for batch in sizes)


def test_groups_by_requested_outputs_oldest_first(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=1000)
    sparse = OutputRequest(dense=False, sparse=True)
    batcher.put([item(loop, 5, sparse, at=1.0), item(loop, 5, DENSE, at=2.0), item(loop, 6, sparse, at=3.0)])
    first = batcher.next_batch()
    assert {i.want for i in first} == {sparse} and len(first) == 2
    assert [i.want for i in batcher.next_batch()] == [DENSE]


def test_waits_for_more_items_until_the_deadline(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=1000, wait_seconds=0.3)
    batcher.put([item(loop, 5)])
    got: list = []
    worker = threading.Thread(target=lambda: got.append(batcher.next_batch()))
    worker.start()
    time.sleep(0.05)
    batcher.put([item(loop, 6)])
    worker.join(5)
    assert len(got[0]) == 2


def test_full_budget_cuts_without_waiting(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=20, wait_seconds=60)
    batcher.put([item(loop, 10), item(loop, 10)])
    started = time.monotonic()
    assert len(batcher.next_batch()) == 2
    assert time.monotonic() - started < 30


def test_cancelled_items_are_skipped_and_close_drains(loop):
    batcher = TokenBudgetBatcher(max_batch_tokens=1000)
    keep, drop = item(loop, 3), item(loop, 4)
    drop.cancelled = True
    batcher.put([keep, drop])
    batcher.close()
    assert batcher.next_batch() == [keep]
    assert batcher.next_batch() is None
    with pytest.raises(ShuttingDown):
        batcher.put([item(loop, 1)])


def test_slots():
    slots = InputSlots(4)
    with slots.hold(3):
        with pytest.raises(Overloaded):
            slots.acquire(2)
        slots.acquire(1)
        slots.release(1)
    assert slots.taken == 0
