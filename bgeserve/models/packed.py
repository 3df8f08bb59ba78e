"""Packed (padding-free) batches: the tokens of every sequence concatenated, plus where each one starts.

Linear layers and the feed-forward run on the [total_tokens, hidden] matrix, so no FLOP is spent on
padding; only attention needs the sequence boundaries. It runs per sequence: FlashAttention's varlen
kernel on CUDA in fp16/bf16, one SDPA call per sequence on the CPU (whose per-call overhead is tiny next
to the matrix products), and a padded SDPA over scattered rows on CUDA in fp32 where varlen has no kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

_varlen_attn: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None
try:  # torch >= 2.9; CUDA only.
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


@dataclass(frozen=True)
class PackedBatch:
    """Token ids of a batch back to back, with each sequence's length and start."""

    ids: torch.Tensor  # [T] int64, every sequence's ids in order
    lengths: list[int]  # per sequence, host side (split sizes)
    starts: torch.Tensor  # [B] int64, index of each sequence's first token
    segment: torch.Tensor  # [T] int64, which sequence each token belongs to
    offset: torch.Tensor  # [T] int64, each token's position inside its sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative lengths (FlashAttention's format)

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], device: str | torch.device = "cpu") -> PackedBatch:
        """Packs non-empty id sequences; tensors are built on the host and moved once."""
        lengths = [len(seq) for seq in sequences]
        if not lengths or min(lengths) < 1:
            raise ValueError("a packed batch needs at least one sequence and no empty one")
        ids = torch.tensor([token for seq in sequences for token in seq], dtype=torch.long)
        length_t = torch.tensor(lengths, dtype=torch.long)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(length_t, 0, out=cu[1:])
        segment = torch.repeat_interleave(torch.arange(len(lengths)), length_t)
        offset = torch.arange(len(ids)) - cu[:-1][segment]
        return cls(
            ids=ids.to(device),
            lengths=lengths,
            starts=cu[:-1].to(device),
            segment=segment.to(device),
            offset=offset.to(device),
            cu_seqlens=cu.to(torch.int32).to(device),
        )

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def pad(self, flat: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[T, ...] -> [B, max_len, ...], `fill` where a sequence has no token."""
        out = flat.new_full((len(self.lengths), self.max_len, *flat.shape[1:]), fill)
        out[self.segment, self.offset] = flat
        return out

    def mask(self) -> torch.Tensor:
        """[B, max_len] int64 attention mask of the padded layout (1 = token)."""
        return self.pad(torch.ones_like(self.ids), 0)

    def gather_index(self) -> torch.Tensor:
        """[B, max_len]: for each padded slot the packed row it takes; row 0 where the slot is padding (any
        real row does: the key mask hides it, and what a padding slot's query computes is never read)."""
        return self.pad(torch.arange(len(self.ids), device=self.ids.device), 0)

    def scatter_index(self) -> torch.Tensor:
        """[T]: each packed row's place in the flattened [B * max_len] padded layout."""
        return self.segment * self.max_len + self.offset


def packed_attention(qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Self-attention within each sequence. qkv: [T, 3, heads, head_dim] -> context [T, heads * head_dim]."""
    total = qkv.shape[0]
    if qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and _varlen_attn is not None:
        q, k, v = qkv.unbind(1)
        try:
            out = _varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len)
            # Typed for both forms; without `return_aux` it returns the output alone, not (output, aux).
            return cast(torch.Tensor, out).reshape(total, -1)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            # e.g. a GPU or head size FlashAttention has no kernel for, or a torch whose (young) varlen API takes
            # other arguments: the padded path gives the same result.
            warnings.warn(f"varlen attention unavailable here ({exc}); using padded SDPA", RuntimeWarning, stacklevel=2)
    if qkv.is_cuda:
        return padded_attention(qkv, batch)
    return per_sequence_attention(qkv, batch)


def per_sequence_attention(qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """One SDPA call per sequence, no mask and no padding."""
    if len(batch.lengths) == 1:
        return sequence_attention(qkv)
    out = qkv.new_empty(qkv.shape[0], qkv.shape[2] * qkv.shape[3])
    start = 0
    for n, chunk in zip(batch.lengths, qkv.split(batch.lengths), strict=True):
        out[start : start + n] = sequence_attention(chunk)
        start += n
    return out


def sequence_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Self-attention over one whole sequence: qkv [n, 3, heads, head_dim] -> context [n, heads * head_dim]."""
    # 4-D [1, heads, n, head_dim]: the CPU's fused (flash) SDPA kernel takes only 4-D inputs; 3-D ones
    # fall back to the unfused math path, several times slower in fp32 and bf16 alike.
    q, k, v = qkv.permute(1, 2, 0, 3).unsqueeze(1)
    ctx = F.scaled_dot_product_attention(q, k, v)[0]  # [heads, n, head_dim]
    return ctx.transpose(0, 1).reshape(qkv.shape[0], -1)


def padded_attention(qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Spreads the rows into a padded batch for one masked SDPA call, then takes the real rows back."""
    heads = qkv.shape[2]
    key_mask = batch.mask().to(torch.bool)[:, None, None, :]

    def sdpa(padded: torch.Tensor) -> torch.Tensor:
        b, width = padded.shape[:2]
        q, k, v = padded.view(b, width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask).transpose(1, 2).reshape(b, width, -1)

    return gathered_attention(qkv, batch.gather_index(), batch.scatter_index(), sdpa)


# What a padded attention group costs, in units of one padding slot's attention work (onnxruntime's CPU
# MultiHeadAttention with its Split and Gather, ~3.7 us a slot and layer on a 2-vCPU AVX512 EPYC, bge-m3):
# each run adds a fixed cost (the weights streamed once more, ~2,000 nodes dispatched, products on fewer
# rows; a 3-token run of bge-m3 took 35 ms, ~400 slots), and a slot's S^2 part equals its linear part at
# S ~ 150. The optimum is flat: twice or four times the run cost moved the 48-text bench corpus by under 1%
# (BENCHMARKS.md, "Attention groups chosen by cost").
GROUP_RUN_COST = 400.0
GROUP_QUADRATIC_LENGTH = 150.0


def attention_groups(
    lengths: list[int], run_cost: float = GROUP_RUN_COST, quadratic_length: float = GROUP_QUADRATIC_LENGTH
) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length, longest first, that minimise the estimated cost of
    running each group padded to its longest: `run_cost` per group plus, per sequence, its padded slots
    S * (1 + S / quadratic_length). A batch planned by token budget can hold one 500-token text with 31 of 30
    tokens: padded together, attention would do ~16x the work of the real sequences. But a group of a few
    short texts costs a whole run of the graph for little attention saved, so it joins its neighbour."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    width = np.array([lengths[i] for i in order], dtype=np.float64)
    slot = width * (1.0 + width / quadratic_length)  # what each position costs as a group's longest
    best = np.zeros(len(order) + 1)  # best[j]: the cheapest grouping of the j longest
    start = np.zeros(len(order) + 1, dtype=np.int64)  # where that grouping's last group begins
    for j in range(1, len(order) + 1):
        # A last group order[i:j] is padded to width[i]: (j - i) sequences of slot[i] each.
        costs = best[:j] + run_cost + (j - np.arange(j)) * slot[:j]
        start[j] = int(np.argmin(costs))
        best[j] = costs[start[j]]
    groups: list[list[int]] = []
    j = len(order)
    while j > 0:
        groups.append(order[int(start[j]) : j])
        j = int(start[j])
    return groups[::-1]


def gathered_attention(
    qkv: torch.Tensor,
    gather_index: torch.Tensor,
    scatter_index: torch.Tensor,
    attend: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The padded layout given as tensors (see PackedBatch), so that it also traces into an ONNX graph: packed
    [T, 3, heads, head_dim] -> padded [B, S, 3 * hidden] (q, k, v side by side) -> `attend` (masked
    attention, -> [B, S, hidden]) -> packed [T, hidden]. Padding costs attention FLOPs here, not projection
    ones."""
    # flatten, not reshape by traced sizes: one graph node each, no shape arithmetic around it.
    return attend(qkv.flatten(1)[gather_index]).flatten(0, 1)[scatter_index]
