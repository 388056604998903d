"""Attention in plain PyTorch: the CPU path and the numerical reference.

The cache is laid out [kv_heads, blocks, block_size, head_dim], so gathering a sequence's blocks
is one index_select per tensor whose result is already [kv_heads, tokens, head_dim]: far cheaper
on a CPU than advanced indexing over a token-major layout. Prefill chunks attend one sequence at a
time; all decodes attend in one padded call. Grouped query heads are folded into the query
length so keys and values are never repeated. With the C++ kernels, chunks and decodes read the
paged cache in place instead (CpuKernelAttentionBackend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sarathi_engine.attention import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        self.write(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.num_prefills == 0:
            return self.attend_decodes(q, k_cache, v_cache, *meta.decode_tables, scale, sliding_window)
        out = torch.empty_like(q)
        start = 0
        for i in range(meta.num_prefills):
            n = meta.query_lens[i]
            chunk = slice(start, start + n)
            out[chunk] = self.attend_prefill(q[chunk], k[chunk], v[chunk], k_cache, v_cache, meta, i, scale,
                                             sliding_window)
            start += n
        if start < q.shape[0]:
            out[start:] = self.attend_decodes(q[start:], k_cache, v_cache, *meta.decode_tables, scale, sliding_window)
        return out

    def attend_prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, i: int, scale: float,
                       window: int | None) -> torch.Tensor:
        """Sequence i's chunk: its new queries, keys and values (already written to the cache)."""
        n, length = meta.query_lens[i], meta.context_lens[i]
        if n == length:  # nothing cached yet: the chunk's own keys are the whole context
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            blocks = meta.block_tables[i, : -(-length // k_cache.shape[2])]
            keys, values = (gather(cache, blocks)[:, :length].to(q.dtype) for cache in (k_cache, v_cache))
        return attend_chunk(q, keys, values, scale, window, meta.chunk_masks)

    def write(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor) -> None:
        write(k, k_cache, slots)
        write(v, v_cache, slots)

    def attend_decodes(self, q, k_cache, v_cache, block_tables, context_lens, scale, window):
        return attend_decodes(q, k_cache, v_cache, block_tables, context_lens, scale, window)


class CpuKernelAttentionBackend(TorchAttentionBackend):
    """The C++ kernels' attention (sarathi_engine.kernels): queries in float32 over a cache in the
    model's dtype, read in place by prefill chunks and decodes alike (no gathered copy, no mask)."""

    name = "cpu-kernels"

    def write(self, k, v, k_cache, v_cache, slots) -> None:
        torch.ops.sarathi.write_kv(k, v, k_cache, v_cache, slots)

    @staticmethod
    def prefills_in_place(head_dim: int) -> bool:
        """Whether the kernel's prefill takes this head_dim: its key panels are 16 lanes wide."""
        return head_dim % 16 == 0

    def attend_prefill(self, q, k, v, k_cache, v_cache, meta, i, scale, window):
        if not self.prefills_in_place(q.shape[-1]):
            return super().attend_prefill(q, k, v, k_cache, v_cache, meta, i, scale, window)
        return torch.ops.sarathi.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables[i],
                                                         meta.context_lens[i], scale, window or 0)

    def attend_decodes(self, q, k_cache, v_cache, block_tables, context_lens, scale, window):
        return torch.ops.sarathi.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                        window or 0)


def write(new: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """new: [tokens, kv_heads, dim] into the flat slots of cache [kv_heads, blocks, block_size, dim]."""
    cache.view(cache.shape[0], -1, cache.shape[3]).index_copy_(1, slots, new.transpose(0, 1))


def gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[kv_heads, len(blocks) * block_size, dim]: the blocks' tokens in order."""
    return cache.index_select(1, blocks).flatten(1, 2)


def attend_chunk(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None,
                 masks: dict) -> torch.Tensor:
    """q: [n, heads, dim], the last n positions of a context of keys/values [kv_heads, length, dim];
    masks: the batch's chunk masks by shape (AttentionMetadata.chunk_masks)."""
    n, heads, dim = q.shape
    kv_heads, length, _ = keys.shape
    group = heads // kv_heads
    qg = q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * n, dim)
    if n == length and window is None:
        # One causal mask for every head group: fold the group back out so is_causal lines up.
        out = F.scaled_dot_product_attention(
            qg.view(kv_heads, group, n, dim), keys.unsqueeze(1), values.unsqueeze(1), is_causal=True, scale=scale
        )
    else:
        shape = (n, length, window, group, q.dtype)
        if shape not in masks:
            masks[shape] = chunk_bias(n, length, window, group, q.dtype, q.device)
        bias = masks[shape]
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, scale=scale)
    return out.reshape(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)


def chunk_bias(n: int, length: int, window: int | None, group: int, dtype: torch.dtype, device) -> torch.Tensor:
    """chunk_mask for `group` query heads stacked, as the additive mask SDPA applies (0 where a key
    is seen, -inf elsewhere). attend_chunk keeps it for the batch's other layers: built and
    converted from bool in every layer, masks were about a tenth of a 128-token chunk's iteration."""
    seen = chunk_mask(n, length, window, device).repeat(group, 1)
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def chunk_mask(n: int, length: int, window: int | None, device) -> torch.Tensor:
    """[n, length] bool: query i sits at position length - n + i and sees keys at or before it."""
    q_pos = torch.arange(length - n, length, device=device)[:, None]
    k_pos = torch.arange(length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend_decodes(q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int | None) -> torch.Tensor:
    """q: [batch, heads, dim], one query per sequence at position context_len - 1."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    longest = int(context_lens.max())
    blocks = block_tables[:, : -(-longest // k_cache.shape[2])]
    padded = blocks.shape[1] * k_cache.shape[2]
    keys = gather(k_cache, blocks.flatten()).view(kv_heads, batch, padded, dim).transpose(0, 1)
    values = gather(v_cache, blocks.flatten()).view(kv_heads, batch, padded, dim).transpose(0, 1)
    k_pos = torch.arange(padded, device=q.device)[None, :]
    lens = context_lens[:, None].to(k_pos.dtype)
    mask = k_pos < lens
    if window is not None:
        mask &= k_pos >= lens - window
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(batch, heads, dim)
