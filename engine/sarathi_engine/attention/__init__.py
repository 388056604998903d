"""Attention backends behind one interface.

A batch is a flat run of tokens from several sequences: prefill chunks first, then decodes.
Each backend writes the new keys and values into the paged cache (`slot_mapping`) and attends
every query to its sequence's cached prefix plus, causally, its own chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
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


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


def select_backend(device: torch.device) -> AttentionBackend:
    """flash-attn on CUDA when it is installed, the torch backend everywhere else."""
    if device.type == "cuda":
        from sarathi_engine.attention.flash_backend import FlashAttentionBackend, flash_attn_available

        if flash_attn_available():
            return FlashAttentionBackend()
    from sarathi_engine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def write_to_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
