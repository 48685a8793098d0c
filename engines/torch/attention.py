"""Attention over a paged KV cache.

One engine step packs every scheduled token of every sequence into one `[T, ...]` batch; projections
and MLPs run on that packed batch. Attention needs each sequence's own context, which lives in the
paged cache (`[2, num_blocks, block_size, kv_heads, head_dim]` per layer) at the blocks its block
table names. The new tokens' K/V are written into their slots first, so every sequence's whole
context (cached prefix + new tokens) is then read back through its block table:
- decode-like sequences (one new token) run batched: one SDPA per `DecodeGroup` over their gathered
  contexts, padded to the group's longest with a key-length mask (usually one group per step;
  sequences of very different lengths are split so padding at most doubles the work);
- prefill chunks run one SDPA each: causal over the new tokens when nothing precedes them, else
  against the gathered prefix blocks plus the new tokens, causal aligned to the bottom right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclass(frozen=True)
class PrefillSpan:
    """A chunk of more than one new token: packed rows `begin:end`, context length `context_len`."""

    begin: int
    end: int
    start_pos: int
    context_len: int
    block_table: torch.Tensor  # [blocks covering context_len]
    # [n, context_len] additive (-inf above the bottom-right diagonal), built once per step where
    # SDPA has no fused kernel for that alignment (CPU); None: `causal_lower_right`, which CUDA's
    # flash kernel runs without materialising anything
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeGroup:
    """One-token sequences attended together: packed `rows`, their block tables padded to the
    group's widest (`tables` [D, blocks]) and the additive mask of the padding keys (`mask`
    [D, 1, 1, keys], -inf past each row's context)."""

    rows: torch.Tensor
    tables: torch.Tensor
    mask: torch.Tensor
    whole: bool = False  # the group is every row of the step, in order (rows == arange(T))


@dataclass(frozen=True)
class StepLayout:
    """Where one step's packed tokens go in the cache and what each of them attends to; built once
    per step by the runner and shared by every layer."""

    positions: torch.Tensor  # [T] absolute position of each packed token
    slots: torch.Tensor  # [T] flat cache slot (block * block_size + offset) each token's K/V goes to
    decodes: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillSpan, ...]


def write_kv(kv_layer: torch.Tensor, layout: StepLayout, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the new tokens' K/V ([T, kv_heads, head_dim]) in their slots of one layer's cache."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_layer.shape
    flat = kv_layer.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, layout.slots, k)
    flat[1].index_copy_(0, layout.slots, v)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, layout: StepLayout
) -> torch.Tensor:
    """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] of the new tokens -> [T, heads, head_dim]."""
    write_kv(kv_layer, layout, k, v)
    # One sequence alone (a prefill, or a decode batch in order) is the common step: its
    # attention output is the step's, with no scatter into a fresh tensor.
    if not layout.prefills and len(layout.decodes) == 1 and layout.decodes[0].whole:
        return _decode_attention(q, kv_layer, layout.decodes[0])
    if not layout.decodes and len(layout.prefills) == 1:
        return _prefill_attention(q, k, v, kv_layer, layout.prefills[0])
    out = torch.empty_like(q)
    for group in layout.decodes:
        out[group.rows] = _decode_attention(q, kv_layer, group)
    for span in layout.prefills:
        out[span.begin : span.end] = _prefill_attention(q, k, v, kv_layer, span)
    return out


def _gather(kv_layer: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks in `tables` ([..., blocks]) as [..., blocks * block_size, kv_heads, hd]."""
    _, _, block_size, kv_heads, head_dim = kv_layer.shape
    shape = (2, *tables.shape[:-1], tables.shape[-1] * block_size, kv_heads, head_dim)
    # One index_select over flat block ids: several times faster than advanced indexing with a 2-D
    # index, and K and V come in one copy.
    kv = kv_layer.index_select(1, tables.reshape(-1)).view(shape)
    return kv[0], kv[1]


def _decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
    kv_heads = kv_layer.shape[3]
    rows = q if group.whole else q[group.rows]  # [D, heads, hd]
    num, heads, head_dim = rows.shape
    # Query heads j*G .. j*G+G-1 share KV head j, so the G heads of one KV head become G "query
    # positions" of the same sequence: no K/V repetition, one SDPA for the whole batch.
    query = rows.view(num, kv_heads, heads // kv_heads, head_dim)
    keys, values = _gather(kv_layer, group.tables)  # [D, L, kv_heads, hd]
    out = F.scaled_dot_product_attention(
        query, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=group.mask
    )
    return out.reshape(num, heads, head_dim)


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, span: PrefillSpan
) -> torch.Tensor:
    query = q[span.begin : span.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
    mask: CausalBias | torch.Tensor | None = None
    if span.start_pos == 0:  # nothing before: the new tokens are the whole context
        keys, values = k[span.begin : span.end], v[span.begin : span.end]
    else:
        keys, values = _gather(kv_layer, span.block_table)
        keys, values = keys[: span.context_len], values[: span.context_len]
        # the n queries are the context's last n positions: causal aligned to the bottom right
        mask = (
            span.mask
            if span.mask is not None
            else causal_lower_right(span.end - span.begin, span.context_len)
        )
    out = F.scaled_dot_product_attention(
        query,
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
