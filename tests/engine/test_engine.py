"""EmbeddingEngine on a fake backend: batching across requests, back-pressure, cancellation, errors."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from bgeserve.core import OutputRequest
from bgeserve.engine.engine import EmbeddingEngine, EngineConfig
from bgeserve.errors import (
    EmptyInput,
    InputTooLong,
    InvalidInput,
    ModelLacksOutput,
    NonFiniteOutput,
    Overloaded,
    RequestTimedOut,
)

from .conftest import FakeBackend, expected_dense

DENSE = OutputRequest()


def make_engine(checkpoint, backends, **config) -> EmbeddingEngine:
    engine = EmbeddingEngine(checkpoint, backends, EngineConfig(**config))
    engine.start()
    return engine


def run(coro):
    return asyncio.run(coro)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]) for _ in range(count))


def test_concurrent_requests_get_their_own_outputs_in_order(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_batch_tokens=256, batch_wait_ms=5)
    rng = random.Random(0)
    requests = [[words(rng, rng.randint(1, 40)) for _ in range(rng.randint(1, 6))] for _ in range(120)]

    async def main():
        results = await asyncio.gather(*(engine.encode(texts, DENSE) for texts in requests))
        await engine.stop()
        return results

    results = run(main())
    for texts, result in zip(requests, results, strict=True):
        assert len(result.outputs) == len(texts)
        for text, output in zip(texts, result.outputs, strict=True):
            ids = fake_checkpoint.tokenizer.encode([text], 64).ids[0]
            np.testing.assert_array_equal(output.dense, expected_dense(ids))
            assert output.num_tokens == len(ids)
        assert result.prompt_tokens == sum(o.num_tokens for o in result.outputs)
    # Inputs of different requests shared batches, and no batch broke the padded-token budget.
    assert max(len(batch) for batch in backend.batches) > 6
    for batch in backend.batches:
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 256
    assert sum(len(batch) for batch in backend.batches) == sum(map(len, requests))
    assert engine.slots.taken == 0


def test_two_replicas_share_one_queue(fake_checkpoint):
    first, second = FakeBackend(), FakeBackend()
    engine = make_engine(fake_checkpoint, [first, second], max_batch_tokens=64)
    assert engine.devices == ["cpu/0", "cpu/1"]

    async def main():
        # Whichever replica takes the first request stays stuck, so the other must serve the rest.
        first.gate.clear()
        second.gate.clear()
        blocked = asyncio.create_task(engine.encode(["held by one replica"], DENSE))
        while not (first.entered.is_set() or second.entered.is_set()):
            await asyncio.sleep(0.01)
        stuck, free = (first, second) if first.entered.is_set() else (second, first)
        free.gate.set()
        done = await asyncio.gather(*(engine.encode([f"text number {i}"], DENSE) for i in range(10)))
        stuck.gate.set()
        await blocked
        await engine.stop()
        return done, stuck, free

    done, stuck, free = run(main())
    assert len(done) == 10
    assert len(stuck.batches) == 1 and sum(map(len, free.batches)) == 10


def test_full_slots_fail_at_once_with_overloaded_and_free_after(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_concurrent_inputs=3, request_window=3)

    async def main():
        backend.gate.clear()
        held = asyncio.create_task(engine.encode(["one", "two"], DENSE))
        await asyncio.to_thread(backend.entered.wait, 5)
        with pytest.raises(Overloaded):
            await engine.encode(["three", "four"], DENSE)
        # One slot is still free.
        small = asyncio.create_task(engine.encode(["five"], DENSE))
        backend.gate.set()
        await asyncio.gather(held, small)
        assert engine.slots.taken == 0
        await engine.encode(["six", "seven", "eight"], DENSE)
        await engine.stop()

    run(main())


def test_cancelled_request_frees_slots_and_never_runs(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_concurrent_inputs=8, request_window=8)

    async def main():
        backend.gate.clear()
        first = asyncio.create_task(engine.encode(["running now"], DENSE))
        await asyncio.to_thread(backend.entered.wait, 5)
        gone = asyncio.create_task(engine.encode(["client went away"] * 4, DENSE))
        while engine.queue_depth < 4:
            await asyncio.sleep(0.01)
        assert engine.slots.taken == 5
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert engine.slots.taken == 1
        backend.gate.set()
        await first
        await engine.stop()

    run(main())
    ids = fake_checkpoint.tokenizer.encode(["client went away"], 64).ids[0]
    assert all(ids not in batch for batch in backend.batches)


def test_timeout_raises_and_frees_slots(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], request_timeout=0.2)

    async def main():
        backend.gate.clear()
        with pytest.raises(RequestTimedOut, match="0.2 s"):
            await engine.encode(["slow"], DENSE)
        assert engine.slots.taken == 0
        backend.gate.set()
        await engine.stop()

    run(main())


def test_timings_show_a_slow_backend_and_the_wait_behind_it(fake_checkpoint):
    """A forward pass held open shows in its request's inference time, and in the queue time of the
    request waiting behind it (one replica); every part lies within the request's total."""
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])

    async def main():
        backend.gate.clear()
        first = asyncio.create_task(engine.encode(["first text"], DENSE))
        assert await asyncio.to_thread(backend.entered.wait, 30)
        held_from = time.monotonic()  # the first forward pass has started by now
        second = asyncio.create_task(engine.encode(["second text here"], DENSE))
        deadline = time.monotonic() + 30
        while not len(engine.batcher):  # the second input is queued by now
            assert time.monotonic() < deadline, "the second input never reached the batcher"
            await asyncio.sleep(0.001)
        queued_by = time.monotonic()
        await asyncio.sleep(0.2)
        released = time.monotonic()  # neither forward pass has ended before this
        backend.gate.set()
        results = await asyncio.gather(first, second)
        await engine.stop()
        return results, released - held_from, released - queued_by

    (first, second), held, waited = run(main())
    assert first.timings.inference >= held
    assert second.timings.queue >= waited
    for result in (first, second):
        t = result.timings
        assert min(t.tokenization, t.queue, t.inference) >= 0
        assert t.tokenization + t.queue + t.inference <= t.total
    assert (first.characters, second.characters) == (len("first text"), len("second text here"))
    assert [first.prompt_tokens, second.prompt_tokens] == [len(batch[0]) for batch in backend.batches]


def test_truncation_and_length_limit(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])
    long_text = "word " * 200
    tailed = "head start " + long_text + "final tail"

    async def main():
        result = await engine.encode([long_text, "short"], DENSE)
        assert result.truncated == 1
        assert result.outputs[0].num_tokens == 64
        right = await engine.encode([tailed], DENSE)
        kept_right = backend.batches[-1][0]  # one request at a time: the last batch is its own
        left = await engine.encode([tailed], DENSE, direction="left")
        kept_left = backend.batches[-1][0]
        with pytest.raises(InputTooLong, match="limit of 64"):
            await engine.encode(["short", long_text], DENSE, truncate=False)
        with pytest.raises(InputTooLong):
            await engine.encode([[101, *range(1000, 1100), 102]], DENSE, truncate=False)
        capped = await engine.encode(["word " * 30], DENSE, max_length=10)
        assert capped.outputs[0].num_tokens == 10
        with pytest.raises(InvalidInput, match="max_length"):
            await engine.encode(["x"], DENSE, max_length=65)
        await engine.stop()
        return right, kept_right, left, kept_left

    right, kept_right, left, kept_left = run(main())
    tokenizer = fake_checkpoint.tokenizer
    body = tokenizer.encode([tailed], 10_000).ids[0][1:-1]  # the whole text's tokens, no specials
    assert len(body) > 62
    # Right truncation keeps the start of the text, left truncation its end; both keep [CLS] ... [SEP].
    assert kept_right == [101, *body[:62], 102]
    assert kept_left == [101, *body[-62:], 102]
    assert tokenizer.decode(kept_left).endswith("word final tail")
    assert tokenizer.decode(kept_right).startswith("head start word")
    assert left.truncated == right.truncated == 1 and left.outputs[0].num_tokens == 64
    np.testing.assert_array_equal(left.outputs[0].dense, expected_dense(kept_left))
    np.testing.assert_array_equal(right.outputs[0].dense, expected_dense(kept_right))


def test_token_id_inputs_are_used_as_given(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])

    async def main():
        result = await engine.encode([[101, 7592, 102], "hello"], DENSE)
        with pytest.raises(InvalidInput, match="vocabulary"):
            await engine.encode([[101, 10**9]], DENSE)
        with pytest.raises(InvalidInput, match="vocabulary"):
            await engine.encode([[-1]], DENSE)
        with pytest.raises(EmptyInput):
            await engine.encode([[]], DENSE)
        await engine.stop()
        return result

    result = run(main())
    np.testing.assert_array_equal(result.outputs[0].dense, result.outputs[1].dense)


def test_token_ids_of_another_tokenizer_are_refused_with_the_fix(fake_checkpoint):
    engine = make_engine(fake_checkpoint, [FakeBackend()])
    # What langchain-openai sends by default: tiktoken cl100k ids, no [CLS] ... [SEP] around them.
    foreign = [[9906, 1917, 0], [101, 2023], [2023, 102]]

    async def main():
        for ids in foreign:
            with pytest.raises(InvalidInput, match="check_embedding_ctx_length=False") as caught:
                await engine.encode([[101, 7592, 102], ids], DENSE)
            assert "input 1" in str(caught.value) and "[101]" in str(caught.value)
        assert engine.slots.taken == 0
        # The special tokens alone are what an empty text tokenises to: still this model's ids.
        await engine.encode([[101, 102]], DENSE)
        await engine.stop()

    run(main())


@pytest.mark.parametrize("direction", ["right", "left"])
def test_long_token_ids_are_cut_like_the_text_they_came_from(fake_checkpoint, direction):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])
    text = " ".join(f"w{i}" for i in range(120))
    ids = fake_checkpoint.tokenizer.encode([text], 10_000).ids[0]
    assert len(ids) > 64

    async def main():
        from_text = await engine.encode([text], DENSE, direction=direction)
        from_ids = await engine.encode([ids], DENSE, direction=direction)
        await engine.stop()
        return from_text, from_ids

    from_text, from_ids = run(main())
    assert from_ids.truncated == 1
    text_seq, ids_seq = backend.batches[0][0], backend.batches[1][0]
    assert ids_seq == text_seq and len(ids_seq) == 64
    assert ids_seq[0] == 101 and ids_seq[-1] == 102
    kept = ids[1:63] if direction == "right" else ids[-63:-1]
    assert ids_seq[1:-1] == kept
    np.testing.assert_array_equal(from_ids.outputs[0].dense, from_text.outputs[0].dense)


def test_a_request_larger_than_its_window_streams_through_it(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_concurrent_inputs=8, max_batch_requests=8)
    assert engine.window_size == 2
    texts = [f"text number {i}" for i in range(9)]
    seen_taken = []

    async def main():
        task = asyncio.create_task(engine.encode(texts, DENSE))
        while not task.done():
            seen_taken.append(engine.slots.taken)
            await asyncio.sleep(0)
        result = await task
        await engine.stop()
        return result

    result = run(main())
    assert max(seen_taken) == 2 and engine.slots.taken == 0
    assert max(len(batch) for batch in backend.batches) <= 2
    assert sum(len(batch) for batch in backend.batches) == 9
    expected = fake_checkpoint.tokenizer.encode(texts, 64).ids
    for output, ids in zip(result.outputs, expected, strict=True):
        np.testing.assert_array_equal(output.dense, expected_dense(ids))


def test_a_small_request_is_not_kept_waiting_behind_a_big_one(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_concurrent_inputs=8)
    finished: list[str] = []

    async def request(name: str, texts: list[str]) -> None:
        await engine.encode(texts, DENSE)
        finished.append(name)

    async def main():
        backend.gate.clear()
        big = asyncio.create_task(request("big", [f"bulk text {i}" for i in range(40)]))
        await asyncio.to_thread(backend.entered.wait, 5)
        small = asyncio.create_task(request("small", ["a query"]))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(big, small)
        await engine.stop()

    run(main())
    assert finished == ["small", "big"]
    # The small request ran within the first few batches, not after the 40 bulk inputs.
    position = next(i for i, batch in enumerate(backend.batches) if any(23032 in s for s in batch))
    assert position <= 2, backend.batches


def test_requests_past_the_slots_are_refused_at_once(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_concurrent_inputs=4)

    async def main():
        backend.gate.clear()
        big = [asyncio.create_task(engine.encode([f"bulk {i} {j}" for j in range(5)], DENSE)) for i in range(4)]
        while engine.slots.taken < 4:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="at capacity"):
            await engine.encode(["one more"], DENSE)
        backend.gate.set()
        await asyncio.gather(*big)
        await engine.stop()

    run(main())


@pytest.mark.parametrize(
    ("inputs", "error"),
    [([], EmptyInput), ([""], EmptyInput), (["ok", "\ud800"], InvalidInput)],
)
def test_bad_inputs_are_typed_errors(fake_checkpoint, inputs, error):
    engine = make_engine(fake_checkpoint, [FakeBackend()])

    async def main():
        with pytest.raises(error):
            await engine.encode(inputs, DENSE)
        assert engine.slots.taken == 0
        await engine.stop()

    run(main())


def test_missing_head_is_refused_before_any_work(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])

    async def main():
        with pytest.raises(ModelLacksOutput, match="colbert_linear.pt"):
            await engine.encode(["x"], OutputRequest(colbert=True))
        await engine.stop()

    run(main())
    assert backend.batches == []


def test_nan_output_is_an_error_and_a_failing_batch_does_not_kill_the_replica(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend])
    poison = fake_checkpoint.tokenizer.encode(["poison"], 64).ids[0][1]
    backend.nan_for.add(poison)

    async def main():
        with pytest.raises(NonFiniteOutput):
            await engine.encode(["poison"], DENSE)
        backend.fail_next = True
        with pytest.raises(RuntimeError, match="fell over"):
            await engine.encode(["anything"], DENSE)
        ok = await engine.encode(["still serving"], DENSE)
        assert engine.healthy
        await engine.stop()
        return ok

    assert np.isfinite(run(main()).outputs[0].dense).all()


def test_requests_with_different_outputs_never_share_a_batch(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], batch_wait_ms=20)

    async def main():
        dense, sparse = await asyncio.gather(
            engine.encode(["alpha beta"] * 3, DENSE),
            engine.encode(["gamma delta"] * 3, OutputRequest(dense=False, sparse=True)),
        )
        await engine.stop()
        return dense, sparse

    dense, sparse = run(main())
    assert all(o.dense is not None and o.lexical_weights is None for o in dense.outputs)
    assert all(o.dense is None and o.lexical_weights for o in sparse.outputs)
    assert len(backend.batches) == 2


def test_stop_finishes_queued_work(fake_checkpoint):
    backend = FakeBackend()
    engine = make_engine(fake_checkpoint, [backend], max_batch_tokens=32)

    async def main():
        backend.gate.clear()
        tasks = [asyncio.create_task(engine.encode([f"queued {i}"], DENSE)) for i in range(5)]
        await asyncio.to_thread(backend.entered.wait, 5)
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0.05)
        backend.gate.set()
        await stopping
        return await asyncio.gather(*tasks)

    results = run(main())
    assert len(results) == 5 and all(r.outputs[0].dense is not None for r in results)
    assert not engine.healthy


def test_token_budget_defaults_to_the_devices(fake_checkpoint):
    """Big batches for GPUs, small ones on the CPU (where packed throughput does not depend on them);
    a budget that is set wins."""
    cpu = EmbeddingEngine(fake_checkpoint, [FakeBackend("cpu"), FakeBackend("cpu")])
    assert cpu.config.max_batch_tokens == 2048 and cpu.batcher.max_batch_tokens == 2048
    gpu = EmbeddingEngine(fake_checkpoint, [FakeBackend("cuda:0")])
    assert gpu.config.max_batch_tokens == 16384
    chosen = EmbeddingEngine(fake_checkpoint, [FakeBackend("cpu")], EngineConfig(max_batch_tokens=300))
    assert chosen.config.max_batch_tokens == 300
