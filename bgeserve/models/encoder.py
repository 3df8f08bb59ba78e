"""BERT / XLM-RoBERTa encoder in plain torch, loaded by weight-name mapping.

Ours rather than transformers' classes so the speed work (packing, fused projections, quantisation,
compile) can change it freely. Q, K and V are fused into one projection at load time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.errors import InvalidCheckpoint
from bgeserve.models.config import EncoderConfig
from bgeserve.models.packed import PackedBatch, packed_attention

# Packed projections [T, 3, heads, head_dim] -> context [T, hidden], attending within each sequence only.
Attention = Callable[[torch.Tensor], torch.Tensor]
# The matrix products of each layer (its nn.Linear attributes): what runs in half precision, int8 or oneDNN.
PROJECTIONS = ("qkv", "attn_out", "ffn_in", "ffn_out")

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`: itself where it already is, so that a traced fp32 graph has no Cast nodes."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.uses_roberta_positions:
            # XLM-R numbers tokens pad_id+1, pad_id+2, ... and gives every pad-id token pad_id. Like
            # transformers (and so FlagEmbedding) this looks at the ids, not the mask: a literal "<pad>"
            # inside a text also keeps pad_id and does not advance the count.
            not_pad = (input_ids != self.cfg.pad_token_id).to(torch.long)
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.cfg.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.embed(input_ids, positions)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ids and position ids of any shape -> [..., hidden]."""
        # Single-segment inputs: token type 0 everywhere. Summed in transformers' order (word + type +
        # position) so that fp32 results agree to the last bits.
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        hidden = hidden + self.position_embeddings(positions)
        return self.LayerNorm(hidden)


def packed_positions(batch: PackedBatch, cfg: EncoderConfig) -> torch.Tensor:
    """Position ids [T] of a packed batch, numbered per sequence exactly as Embeddings.forward does."""
    if not cfg.uses_roberta_positions:
        return batch.offset
    not_pad = (batch.ids != cfg.pad_token_id).to(torch.long)
    count = torch.cumsum(not_pad, dim=0)
    # Subtract the count reached before each sequence's first token: numbering restarts per sequence.
    before = (count - not_pad)[batch.starts][batch.segment]
    return (count - before) * not_pad + cfg.pad_token_id


class EncoderLayer(nn.Module):
    """Post-LN transformer block: fused QKV attention, then GELU feed-forward."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.compute_dtype = torch.float32
        try:
            self.act = _ACTIVATIONS[cfg.hidden_act]
        except KeyError as exc:
            raise InvalidCheckpoint(f"activation {cfg.hidden_act!r} is not supported") from exc

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # The residual stream and LayerNorms stay in their own (fp32) precision while the projections
        # may run in fp16/bf16: sums and norms in fp32 are what keep half precision free of inf/NaN.
        b, n, h = hidden.shape
        x = _in_dtype(hidden, self.compute_dtype)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        ctx = ctx.transpose(1, 2).reshape(b, n, h)
        hidden = self.attn_norm(_in_dtype(self.attn_out(ctx), hidden.dtype) + hidden)
        return self._feed_forward(hidden)

    def forward_packed(self, hidden: torch.Tensor, attend: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The same block on packed tokens [T, hidden]: projections on all rows; `attend` maps the
        [T, 3, heads, head_dim] projections to the [T, hidden] context, keeping to each sequence.
        `rows` (indices into T): only those rows go on past attention, so the result is [len(rows), hidden];
        every token's keys and values are still computed and attended to."""
        x = _in_dtype(hidden, self.compute_dtype)
        # Sizes from the config, not from x: a traced graph then reshapes by a constant, with no shape arithmetic.
        qkv = self.qkv(x).view(-1, 3, self.num_heads, self.head_dim)
        ctx = attend(qkv)
        if rows is not None:
            ctx, hidden = ctx[rows], hidden[rows]
        hidden = self.attn_norm(_in_dtype(self.attn_out(ctx), hidden.dtype) + hidden)
        return self._feed_forward(hidden)

    def _feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = _in_dtype(hidden, self.compute_dtype)
        return self.ffn_norm(_in_dtype(self.ffn_out(self.act(self.ffn_in(x))), hidden.dtype) + hidden)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Projections in `dtype`; LayerNorms stay fp32."""
        self.compute_dtype = dtype
        for name in PROJECTIONS:
            getattr(self, name).to(dtype)


class TransformerEncoder(nn.Module):
    """Returns the last hidden state: [batch, seq, hidden] for padded ids, [T, hidden] for a packed batch."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        # Boolean key mask broadcast over heads and queries: True = attend.
        attn_mask = attention_mask.to(torch.bool)[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, attn_mask)
        return hidden

    def forward_packed(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state of every real token, [T, hidden]: no row of padding is ever computed. With
        `rows` (indices into T, e.g. `batch.starts` for the CLS rows), only those rows: [len(rows), hidden]."""
        attend = partial(packed_attention, batch=batch)
        return self.encode_tokens(batch.ids, packed_positions(batch, self.cfg), attend, rows)

    def encode_tokens(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attention, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Packed ids and position ids [T] -> [T, hidden], attention done by `attend` (see forward_packed;
        the ONNX export passes a traceable one). `rows`: the last layer computes only those rows past its
        attention (no later layer needs the others' hidden states), -> [len(rows), hidden]."""
        return run_layers(self.layers, self.embeddings.embed(input_ids, positions), attend, rows)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Runs the layers' matrix products in `dtype` (fp16/bf16); embeddings, LayerNorms and the
        residual stream stay fp32."""
        for layer in cast(Iterable[EncoderLayer], self.layers):
            layer.set_compute_dtype(dtype)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads weights named as transformers' BertModel / XLMRobertaModel save them."""
        mapped = map_hf_weights(state, self.cfg.num_layers)
        # assign=True adopts the loaded tensors instead of copying them into the initialised ones: built on
        # the meta device, the module never holds a second copy of the weights.
        missing, unexpected = self.load_state_dict(
            {k: v.float() for k, v in mapped.items()}, strict=False, assign=True
        )
        if missing or unexpected:
            raise InvalidCheckpoint(
                f"checkpoint weights do not fit a {self.cfg.model_type} encoder: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, attend: Attention,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """Embedded packed tokens [T, hidden] through every layer (see TransformerEncoder.encode_tokens)."""
    stack = cast(list[EncoderLayer], list(layers))  # ModuleList yields plain Modules
    for index, layer in enumerate(stack):
        hidden = layer.forward_packed(hidden, attend, rows if index == len(stack) - 1 else None)
    return hidden


_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_MODEL_PREFIXES = ("roberta.", "bert.", "model.", "xlm_roberta.")
_IGNORED_PREFIXES = ("pooler.", "lm_head.", "cls.", "embeddings.position_ids")


def _normalise_key(key: str) -> str:
    for prefix in _MODEL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    # Very old BERT checkpoints name LayerNorm parameters gamma / beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def map_hf_weights(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Renames Hugging Face weights to ours and fuses query/key/value into `qkv`."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for raw_key, tensor in state.items():
        key = _normalise_key(raw_key)
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key.startswith("embeddings."):
            out[key] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            out[key] = tensor  # reported as unexpected by load_state_dict
            continue
        layer, rest = int(match.group(1)), match.group(2)
        module, _, param = rest.rpartition(".")
        if module.startswith("attention.self."):
            qkv_parts.setdefault((layer, param), {})[module.rsplit(".", 1)[1]] = tensor
        elif module in _LAYER_NAMES:
            out[f"layers.{layer}.{_LAYER_NAMES[module]}.{param}"] = tensor
        else:
            out[key] = tensor
    for (layer, param), parts in qkv_parts.items():
        if set(parts) != {"query", "key", "value"}:
            raise InvalidCheckpoint(f"layer {layer}: attention {param} lacks one of query/key/value")
        out[f"layers.{layer}.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out
