"""The paged KV cache: fixed-size blocks, each sequence's block table, and the memory behind them.

BlockManager is pure bookkeeping (which block belongs to whom); allocate_kv_cache makes the
tensors. A block holds `block_size` consecutive tokens of one sequence for every layer.
"""
from __future__ import annotations

from collections import deque

import torch

from sarathi_engine.config import ModelConfig
from sarathi_engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1 - len(self._free) / self.num_blocks

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq still needs so that its table covers its first num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_admit(self, seq: Sequence, num_tokens: int, keep_watermark: bool) -> bool:
        reserve = self.watermark_blocks if keep_watermark else 0
        return self.num_free_blocks - self.blocks_missing(seq, num_tokens) >= reserve

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_missing(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        missing = self.blocks_missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"{missing} blocks needed for {seq}, {self.num_free_blocks} free")
        seq.block_table.extend(self._free.popleft() for _ in range(missing))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size


def bytes_per_block(cfg: ModelConfig, num_layers: int, num_kv_heads: int, block_size: int) -> int:
    element = torch.empty((), dtype=cfg.dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * cfg.head_dim * element


def allocate_kv_cache(cfg: ModelConfig, num_layers: int, layer_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[layers, 2 (key, value), *layer_shape], the layer shape being the attention backend's."""
    return torch.zeros(num_layers, 2, *layer_shape, dtype=cfg.dtype, device=device)
