"""Small batches on CUDA replayed from captured CUDA graphs.

A short query on a GPU spends most of its time launching ~15 kernels per layer, not running them. A CUDA
graph captured once per padded shape replays them all with one launch. Shapes are bucketed (batch sizes
and lengths below) so a dozen graphs cover every small batch; anything bigger runs the normal way, where
launches are a small share of the time. All graphs share one memory pool: only one replays at a time per
backend, and each keeps its own inputs and output alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

GRAPH_BATCHES = (1, 2, 4, 8)
GRAPH_LENGTHS = (32, 64, 128)

PaddedForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) [b, L] -> [b, L, hidden]


def graph_shape(
    batch_size: int, max_len: int, batches: tuple[int, ...] = GRAPH_BATCHES, lengths: tuple[int, ...] = GRAPH_LENGTHS
) -> tuple[int, int] | None:
    """The smallest captured (batch, length) that holds the batch; None when it is bigger than all of them."""
    batch = next((b for b in batches if b >= batch_size), None)
    length = next((n for n in lengths if n >= max_len), None)
    if batch is None or length is None or batch_size < 1 or max_len < 1:
        return None
    return batch, length


class GraphedForward:
    """One CUDA graph per (batch, length) bucket over a padded forward; captured at construction."""

    def __init__(
        self,
        forward: PaddedForward,
        device: str,
        pad_id: int,
        batches: tuple[int, ...] = GRAPH_BATCHES,
        lengths: tuple[int, ...] = GRAPH_LENGTHS,
    ) -> None:
        self.batches, self.lengths = batches, lengths
        self._pad_id = pad_id
        self._pool: torch.cuda._POOL_HANDLE | None = None  # one memory pool for every graph, made at the first capture
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        with torch.inference_mode():
            for batch in batches:
                for length in lengths:
                    self._graphs[batch, length] = self._capture(forward, device, batch, length)
        log.info("captured %d CUDA graphs (batches %s x lengths %s)", len(self._graphs), batches, lengths)

    def _capture(self, forward: PaddedForward, device: str, batch: int, length: int):  # noqa: ANN202
        """(graph, its input ids, its mask, its output): replaying the graph reruns `forward` on the inputs."""
        ids = torch.full((batch, length), self._pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, length), dtype=torch.long, device=device)
        mask[:, 0] = 1  # every row attends to something: no all-masked softmax in the unused rows
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm-up on a side stream first (library handles, kernel choice), as PyTorch's CUDA graph notes do.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(ids, mask)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward(ids, mask)
        return graph, ids, mask, out

    def fits(self, batch_size: int, max_len: int) -> bool:
        """Whether a batch of that many texts, the longest `max_len` tokens, replays a graph."""
        return graph_shape(batch_size, max_len, self.batches, self.lengths) is not None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """[b, L, hidden] for padded `ids`/`mask` [b, L], or None when no graph holds that shape. The result
        is a view of the graph's output buffer: copy what you keep before the next call."""
        b, n = ids.shape
        shape = graph_shape(b, n, self.batches, self.lengths)
        if shape is None:
            return None
        graph, static_ids, static_mask, out = self._graphs[shape]
        static_ids.fill_(self._pad_id)
        static_mask.zero_()
        static_mask[:, 0] = 1
        static_ids[:b, :n].copy_(ids)
        static_mask[:b, :n].copy_(mask)
        graph.replay()
        return out[:b, :n]
