"""Attention backends behind one interface.

A batch is a flat run of tokens from several sequences: prefill chunks first, then decodes.
Each backend writes the new keys and values into the paged cache (`slot_mapping`) and attends
every query to its sequence's cached prefix plus, causally, its own chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # cached + new tokens per sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks], padded with 0
    num_prefills: int  # sequences with more than one new token come first
    context_lens_tensor: torch.Tensor  # int32 copy of context_lens, on the device
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative query_lens, on the device

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_lens[: self.num_prefills])

    @cached_property
    def chunk_masks(self) -> dict:
        """Attention masks of this batch's prefill chunks, by shape, built by the backend that
        needs them: every layer attends with the same ones, and they go with the batch."""
        return {}

    @cached_property
    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables and context lengths of the decodes (the rows after the prefills): sliced
        once per batch, not in every layer."""
        return self.block_tables[self.num_prefills :], self.context_lens_tensor[self.num_prefills :]


class AttentionBackend(Protocol):
    name: str

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """One layer's key (or value) cache, laid out as this backend reads it fastest."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # cache_shape(...)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


def make_backend(name: str, ops_name: str = "torch") -> AttentionBackend:
    """The backend sarathi_engine.device chose: flash-attn, or the torch family (the C++ kernels'
    attention where the model runs on them, plain torch everywhere else)."""
    if name == "flash-attn":
        from sarathi_engine.attention.flash_backend import FlashAttentionBackend

        return FlashAttentionBackend()
    from sarathi_engine.attention.torch_backend import CpuKernelAttentionBackend, TorchAttentionBackend

    return CpuKernelAttentionBackend() if ops_name == "cpu-kernels" else TorchAttentionBackend()
