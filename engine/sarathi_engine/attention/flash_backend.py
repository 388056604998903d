"""flash-attn on CUDA: the whole mixed batch in one paged varlen call.

Written to flash-attn 2.6+'s documented `flash_attn_varlen_func(..., block_table=...)`; it
cannot run on this project's CPU-only CI. Upstream flash-attn needs paged blocks that are a
multiple of 256 tokens, so the engine picks block size 256 when this backend is in use.
"""
from __future__ import annotations

import torch

from sarathi_engine.attention import AttentionMetadata

FLASH_BLOCK_SIZE = 256


class FlashAttentionBackend:
    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, block_size, num_kv_heads, head_dim)  # what flash-attn's block_table path reads

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, meta.slot_mapping, v)
        cu_seqlens_k = torch.nn.functional.pad(meta.context_lens_tensor.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max(meta.query_lens),
            max_seqlen_k=max(meta.context_lens),
            softmax_scale=scale,
            causal=True,  # aligned bottom-right: a chunk sees its cached prefix
            window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
            block_table=meta.block_tables.to(torch.int32),
        )
