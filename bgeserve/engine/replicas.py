"""Model replicas: one worker thread per replica, each owning a Backend, all fed from one queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from bgeserve.core import ItemOutput
from bgeserve.engine.observer import EngineObserver, NullObserver
from bgeserve.engine.queue import TokenBudgetBatcher, WorkItem
from bgeserve.errors import NonFiniteOutput
from bgeserve.runtime.backend import Backend

log = logging.getLogger(__name__)


class ReplicaPool:
    """Runs batches from the shared batcher on every backend, one thread each.

    Results go back to each waiting request through its asyncio future (`WorkItem.resolve`), so
    the event loop never blocks on a forward pass while the next requests are tokenised.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        batcher: TokenBudgetBatcher,
        observer: EngineObserver | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = list(backends)
        self.batcher = batcher
        self.observer: EngineObserver = observer or NullObserver()
        self.names = _replica_names(self.backends)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Starts one worker thread per backend."""
        if self._threads:
            return
        for name, backend in zip(self.names, self.backends, strict=True):
            thread = threading.Thread(
                target=self._serve, args=(name, backend), name=f"replica-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Lets the workers finish every queued item, then joins them."""
        self.batcher.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def healthy(self) -> bool:
        """True while every worker thread is running."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def _serve(self, name: str, backend: Backend) -> None:
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            self._run(name, backend, batch)

    def _run(self, name: str, backend: Backend, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        try:
            outputs = backend.run([item.ids for item in batch], batch[0].want)
            if len(outputs) != len(batch):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:  # a failed batch must fail its requests, never the worker
            log.exception("replica %s failed on a batch of %d inputs", name, len(batch))
            self.observer.batch_failed(name, len(batch))
            for item in batch:
                item.fail(exc)
            return
        finished = time.monotonic()
        for item, output in zip(batch, outputs, strict=True):
            if _all_finite(output):
                item.resolve(output, started, finished)
            else:
                item.fail(
                    NonFiniteOutput(
                        f"the model produced NaN or infinite values for an input of {output.num_tokens} "
                        f"tokens on {name}; nothing was returned for it"
                    )
                )
        tokens = sum(len(item.ids) for item in batch)
        padded = len(batch) * max(len(item.ids) for item in batch)
        self.observer.batch_done(name, len(batch), tokens, padded, finished - started)


def _all_finite(output: ItemOutput) -> bool:
    for array in (output.dense, output.colbert, output.token_embeddings):
        if array is not None and not np.isfinite(array).all():
            return False
    if output.lexical_weights:
        values = np.fromiter(output.lexical_weights.values(), dtype=np.float64)
        if not np.isfinite(values).all():
            return False
    return True


def _replica_names(backends: Sequence[Backend]) -> list[str]:
    """`cuda:0`, `cuda:1`, ... or `cpu/0`, `cpu/1` when a device holds several replicas."""
    per_device: dict[str, int] = {}
    for backend in backends:
        per_device[backend.device] = per_device.get(backend.device, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for backend in backends:
        index = seen.get(backend.device, 0)
        seen[backend.device] = index + 1
        names.append(backend.device if per_device[backend.device] == 1 else f"{backend.device}/{index}")
    return names
