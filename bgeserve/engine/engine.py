"""EmbeddingEngine: validate and tokenise off the event loop, queue, batch across requests, await."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from bgeserve.core import BackendOptions, Capabilities, ItemOutput, OutputRequest
from bgeserve.engine.observer import EngineObserver, NullObserver
from bgeserve.engine.queue import TokenBudgetBatcher, WorkItem
from bgeserve.engine.replicas import ReplicaPool
from bgeserve.engine.slots import InputSlots
from bgeserve.errors import EmptyInput, InputTooLong, InvalidInput, RequestTimedOut, ShuttingDown
from bgeserve.models.tokenizer import check_direction
from bgeserve.runtime.backend import Backend

if TYPE_CHECKING:
    from bgeserve.models.checkpoint import Checkpoint
    from bgeserve.models.tokenizer import DetailedTokens

T = TypeVar("T")

# Token budget per forward pass when none is set. GPUs need big batches to fill the card. On the CPU,
# packed batches keep the same throughput from 1k to 16k tokens (measured on the full-size bge-m3, 1.58-1.61
# texts/s), so a small budget costs nothing and spares a request queued behind a batch most of the wait.
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048


def default_batch_tokens(backends: Sequence[Backend]) -> int:
    """GPU_BATCH_TOKENS when any replica runs on a GPU, else CPU_BATCH_TOKENS."""
    return GPU_BATCH_TOKENS if any(b.device.startswith("cuda") for b in backends) else CPU_BATCH_TOKENS


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs (the HTTP layer builds this from its settings)."""

    max_batch_tokens: int | None = None  # None: default_batch_tokens() for the replicas' devices
    max_batch_requests: int | None = None
    max_concurrent_inputs: int = 512
    batch_wait_ms: float = 2.0
    request_timeout: float | None = None
    auto_truncate: bool = True
    tokenization_workers: int = 2
    # Inputs one request may have queued or running at once; None: a quarter of the slots.
    request_window: int | None = None


@dataclass(frozen=True)
class Timings:
    """Where one request's time went, in seconds (TEI's x-*-time headers)."""

    tokenization: float
    queue: float
    inference: float
    total: float


@dataclass(frozen=True)
class EncodeResult:
    """Outputs in input order, plus what the response reports about them."""

    outputs: list[ItemOutput]
    prompt_tokens: int
    truncated: int
    characters: int
    timings: Timings


@dataclass(frozen=True)
class _Prepared:
    ids: list[list[int]]
    truncated: int
    characters: int


class EmbeddingEngine:
    """Serves encode requests from many concurrent callers on a pool of model replicas.

    Tokenisation runs in a thread pool (it overlaps the forward pass of the previous batch), each
    input takes one of `max_concurrent_inputs` slots (none free: `Overloaded` at once), and the
    inputs of all requests are packed into token-budget batches by one `TokenBudgetBatcher`.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        backends: Sequence[Backend],
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        config = config or EngineConfig()
        max_batch_tokens = config.max_batch_tokens
        if max_batch_tokens is None:
            max_batch_tokens = default_batch_tokens(backends)
            config = replace(config, max_batch_tokens=max_batch_tokens)
        self.config = config
        self.checkpoint = checkpoint
        self.name: str = checkpoint.name
        self.tokenizer = checkpoint.tokenizer
        self.max_length: int = checkpoint.max_length
        self.hidden_size: int = checkpoint.hidden_size
        self.capabilities: Capabilities = checkpoint.capabilities
        self.vocab_size: int = min(self.tokenizer.vocab_size, checkpoint.config.vocab_size)
        self.slots = InputSlots(self.config.max_concurrent_inputs)
        self.batcher = TokenBudgetBatcher(
            max_batch_tokens,
            self.config.max_batch_requests,
            self.config.batch_wait_ms / 1000.0,
        )
        self.replicas = ReplicaPool(backends, self.batcher, observer)
        self._observer: EngineObserver = observer or NullObserver()
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=max(1, self.config.tokenization_workers), thread_name_prefix="tokenizer"
        )
        self._running = False

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        devices: Sequence[str],
        options: BackendOptions | None = None,
        replicas_per_device: int = 1,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> EmbeddingEngine:
        """Loads the model replicas (one per GPU, `replicas_per_device` on CPU) and wires the engine."""
        from bgeserve.runtime.factory import create_backends  # torch only once replicas are built

        backends = create_backends(checkpoint, devices, options or BackendOptions(), replicas_per_device)
        return cls(checkpoint, backends, config, observer)

    @classmethod
    def load(
        cls,
        model: str | None,
        devices: str,
        options: BackendOptions | None = None,
        replicas_per_device: int = 1,
        config: EngineConfig | None = None,
    ) -> EmbeddingEngine:
        """`from_checkpoint` from a model path or hub id (None: the bundled model) and a device list
        (`cpu`, `cuda:0,cuda:1`, `auto`), warmed up so a broken device fails before serving."""
        from bgeserve.models.checkpoint import load_checkpoint
        from bgeserve.runtime.devices import resolve_devices

        engine = cls.from_checkpoint(
            load_checkpoint(model), resolve_devices(devices), options, replicas_per_device, config
        )
        engine.warmup()
        return engine

    # -- life cycle -------------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        """Replica names (`cuda:0`, `cpu/1`, ...)."""
        return list(self.replicas.names)

    @property
    def dtype(self) -> str:
        return self.replicas.backends[0].dtype

    @property
    def healthy(self) -> bool:
        """Serving, and every replica thread alive."""
        return self._running and self.replicas.healthy

    @property
    def queue_depth(self) -> int:
        """Inputs tokenised and waiting for a replica."""
        return len(self.batcher)

    @property
    def inflight_inputs(self) -> int:
        """Input slots held by requests right now."""
        return self.slots.taken

    @property
    def max_inflight_inputs(self) -> int:
        """Input slots in all (requests past them get Overloaded)."""
        return self.slots.capacity

    @property
    def max_batch_tokens(self) -> int:
        """The token budget of one forward pass, resolved for the replicas' devices."""
        return self.config.max_batch_tokens or default_batch_tokens(self.replicas.backends)

    @property
    def model_path(self) -> str:
        """The checkpoint directory the replicas were loaded from."""
        return str(self.checkpoint.path)

    @property
    def pooling(self) -> str:
        """How a text's dense vector is pooled: "cls" (bge models) or "mean" (e.g. MiniLM)."""
        return self.checkpoint.pooling

    @property
    def min_token_input(self) -> int:
        """The shortest token-id input this model's tokenization can give: its special tokens plus one."""
        return self.tokenizer.shortest_input

    def set_observer(self, observer: EngineObserver) -> None:
        """Routes the engine's measurements to `observer` (the HTTP layer's metrics)."""
        self._observer = observer
        self.replicas.observer = observer

    def warmup(self) -> None:
        """Runs one tiny forward pass on every replica so a broken device fails before serving."""
        probe = self.tokenizer.encode(["warm up"], self.max_length).ids
        want = OutputRequest(
            dense=True, sparse=self.capabilities.sparse, colbert=self.capabilities.colbert
        )
        for backend in self.replicas.backends:
            backend.run(probe, want)

    def start(self) -> None:
        """Starts the replica threads."""
        self.replicas.start()
        self._running = True

    async def stop(self) -> None:
        """Takes no new requests, finishes the queued ones, stops the replicas."""
        self._running = False
        await asyncio.to_thread(self.replicas.stop)
        self._tokenizer_pool.shutdown(wait=False)

    # -- requests ---------------------------------------------------------------------------------

    def check_outputs(self, want: OutputRequest) -> None:
        """Raises ModelLacksOutput when `want` asks for a head this model does not have."""
        self.capabilities.require(want, self.name)

    def resolve_max_length(self, max_length: int | None) -> int:
        """The token limit for one request: the model's, or a smaller one the caller asked for."""
        if max_length is None:
            return self.max_length
        minimum = self.tokenizer.shortest_input
        if max_length < minimum or max_length > self.max_length:
            raise InvalidInput(
                f"max_length must be between {minimum} and the model's limit of {self.max_length} "
                f"tokens, not {max_length}",
                "max_length",
            )
        return max_length

    async def encode(
        self,
        inputs: Sequence[str | list[int]],
        want: OutputRequest,
        *,
        truncate: bool | None = None,
        direction: str = "right",
        max_length: int | None = None,
    ) -> EncodeResult:
        """Encodes texts (or token-id lists, used as given) with the outputs in `want`.

        Inputs longer than the limit are cut when `truncate` (default: the engine's auto_truncate)
        and rejected with InputTooLong otherwise. Raises Overloaded when the slots are full.
        """
        started = time.monotonic()
        if not self._running:
            raise ShuttingDown("the server is not accepting requests (starting up or shutting down)")
        if not inputs:
            raise EmptyInput("no inputs given: send at least one text")
        self.check_outputs(want)
        limit = self.resolve_max_length(max_length)
        truncate = self.config.auto_truncate if truncate is None else truncate
        loop = asyncio.get_running_loop()
        window = min(len(inputs), self.window_size)
        with self.slots.hold(window):
            items: list[WorkItem] = []
            try:
                async with asyncio.timeout(self.config.request_timeout):
                    prepared = await loop.run_in_executor(
                        self._tokenizer_pool, self._prepare, inputs, limit, truncate, direction
                    )
                    tokenized = time.monotonic()
                    items = [WorkItem(ids, want, loop, loop.create_future()) for ids in prepared.ids]
                    results = await self._run_through_window(items, window)
            except TimeoutError as exc:
                raise RequestTimedOut(
                    f"the request did not finish within the server's timeout of "
                    f"{self.config.request_timeout:g} s"
                ) from exc
            finally:
                # Whatever did not finish (timeout, error, client gone) must not run or be delivered.
                # (gather may already have cancelled the futures, so flag every item.)
                for item in items:
                    item.cancelled = True
                    if not item.future.done():
                        item.future.cancel()
        outputs = [result.output for result in results]
        queue = max(result.queue_seconds for result in results)
        inference = max(result.inference_seconds for result in results)
        tokens = sum(output.num_tokens for output in outputs)
        self._observer.request_encoded(len(outputs), tokens, tokenized - started, queue)
        return EncodeResult(
            outputs=outputs,
            prompt_tokens=tokens,
            truncated=prepared.truncated,
            characters=prepared.characters,
            timings=Timings(tokenized - started, queue, inference, time.monotonic() - started),
        )

    @property
    def window_size(self) -> int:
        """Most inputs one request has queued or running at once (default: a quarter of the slots).

        A request of more inputs streams through its window (the next input is queued as one finishes),
        so a 2048-input OpenAI request runs without holding every slot, and a small request that arrives
        behind it waits for at most a window of its inputs, not all of them.
        """
        window = self.config.request_window or self.slots.capacity // 4
        return max(1, min(window, self.slots.capacity))

    async def _run_through_window(self, items: list[WorkItem], window: int) -> list:
        """Queues `window` items, then one more each time one finishes; results in item order."""
        self.batcher.put(items[:window])
        waiting = {item.future for item in items[:window]}
        queued = window
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()  # an error fails the request now; the caller cancels the rest
            more = items[queued: queued + len(done)]
            queued += len(more)
            if more:
                self.batcher.put(more)
                waiting |= {item.future for item in more}
        return [item.future.result() for item in items]

    def _prepare(
        self, inputs: Sequence[str | list[int]], limit: int, truncate: bool, direction: str
    ) -> _Prepared:
        """Validates and tokenises (runs in the tokenizer pool, off the event loop)."""
        check_direction(direction)
        ids: list[list[int] | None] = [None] * len(inputs)
        text_positions: list[int] = []
        texts: list[str] = []
        truncated = 0
        characters = 0
        for index, value in enumerate(inputs):
            if isinstance(value, str):
                _check_text(index, value)
                text_positions.append(index)
                texts.append(value)
                characters += len(value)
            else:
                seq = self._check_own_ids(index, list(value))
                if len(seq) > limit:
                    if not truncate:
                        raise InputTooLong(index, len(seq), limit)
                    seq = self.tokenizer.truncate_ids(seq, limit, direction)
                    truncated += 1
                ids[index] = seq
        if texts:
            # Always cut (a long text costs a window, not its whole length); refuse what was cut if asked to.
            encoded = self.tokenizer.encode(texts, limit, truncate=True, direction=direction)
            for position, seq, was_cut, full in zip(
                text_positions, encoded.ids, encoded.truncated, encoded.full_lengths, strict=True
            ):
                if was_cut and not truncate:
                    raise InputTooLong(position, full, limit)
                truncated += int(was_cut)
                ids[position] = seq
        return _Prepared(ids=ids, truncated=truncated, characters=characters)  # type: ignore[arg-type]

    def _check_own_ids(self, index: int, seq: list[int]) -> list[int]:
        """Ids to embed must be this model's tokenization: in its vocabulary, framed by its special tokens.

        A client that tokenises with another tokenizer (langchain-openai's tiktoken, say) sends ids that
        are valid numbers but mean other words here; embedding them would give a silently wrong vector.
        """
        seq = self._check_ids(index, seq)
        if not self.tokenizer.is_own_tokenization(seq):
            prefix, suffix = list(self.tokenizer.prefix_ids), list(self.tokenizer.suffix_ids)
            raise InvalidInput(
                f"input {index} is a list of token ids that does not start with {prefix} and end with "
                f"{suffix}, the special tokens this model's tokenizer adds, so it is not this model's "
                f"tokenization (ids from another tokenizer would embed other words). Send the text "
                f"instead, or ids from POST /tokenize. langchain-openai sends tiktoken ids by default: "
                f"use OpenAIEmbeddings(..., check_embedding_ctx_length=False)"
            )
        return seq

    def _check_ids(self, index: int, seq: list[int]) -> list[int]:
        if not seq:
            raise EmptyInput(f"input {index} is an empty list of token ids")
        bad = next((t for t in seq if not isinstance(t, int) or t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidInput(
                f"input {index} holds token id {bad!r}, outside the model's vocabulary "
                f"[0, {self.vocab_size})"
            )
        return seq

    async def tokenize(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        *,
        truncate: bool | None = None,
        direction: str = "right",
    ) -> list[DetailedTokens]:
        """TEI /tokenize: token id, text, special flag and character offsets per input, cut to the
        model's limit like `encode` cuts (InputTooLong when `truncate` is false). Takes input slots."""
        if not texts:
            raise EmptyInput("no inputs given: send at least one text")
        check_direction(direction)
        for index, text in enumerate(texts):
            _check_text(index, text)
        truncate = self.config.auto_truncate if truncate is None else truncate

        def work() -> list[DetailedTokens]:
            results = []
            for index, text in enumerate(texts):
                result = self.tokenizer.tokenize_detailed(text, add_special_tokens, self.max_length, direction)
                if result.truncated and not truncate:
                    raise InputTooLong(index, result.full_length, self.max_length)
                results.append(result)
            return results

        return await self._in_tokenizer_pool(len(texts), work)

    async def decode(self, sequences: Sequence[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """TEI /decode: token ids back to text, one string per sequence. Takes input slots."""
        if not sequences:
            raise EmptyInput("no ids given")
        checked = [
            self._check_ids(index, list(seq)) if seq else [] for index, seq in enumerate(sequences)
        ]
        return await self._in_tokenizer_pool(
            len(checked), lambda: [self.tokenizer.decode(seq, skip_special_tokens) for seq in checked]
        )

    async def _in_tokenizer_pool(self, inputs: int, work: Callable[[], T]) -> T:
        """Runs `work` in the tokenizer pool holding slots for `inputs` (as encode does: at most a
        window of them), so tokenizer-only routes count towards the same back-pressure and timeout."""
        if not self._running:
            raise ShuttingDown("the server is not accepting requests (starting up or shutting down)")
        loop = asyncio.get_running_loop()
        with self.slots.hold(min(inputs, self.window_size)):
            try:
                async with asyncio.timeout(self.config.request_timeout):
                    return await loop.run_in_executor(self._tokenizer_pool, work)
            except TimeoutError as exc:
                raise RequestTimedOut(
                    f"the request did not finish within the server's timeout of "
                    f"{self.config.request_timeout:g} s"
                ) from exc


def _check_text(index: int, text: str) -> None:
    if not text:
        raise EmptyInput(f"input {index} is an empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON escapes can smuggle lone surrogates in; the tokenizer would crash on them.
        raise InvalidInput(f"input {index} is not valid Unicode text (it holds a lone surrogate)") from exc
