"""The paged KV cache: fixed-size blocks, each sequence's block table, the prefix cache over
them, and the memory behind them.

BlockManager is pure bookkeeping (which block belongs to whom); allocate_kv_cache makes the
tensors. A block holds `block_size` consecutive tokens of one sequence for every layer.

Prefix caching follows vLLM's automatic prefix caching: a full block, once computed, is keyed by
a hash chained over its tokens and every block before it, so equal keys mean equal tokens from
the sequence's first token on, and so equal KV. A new sequence starts from the longest run of
cached blocks that begins its tokens and computes only the rest. Blocks are reference-counted;
one that no sequence holds stays cached until its memory is needed, the least recently freed
first, and blocks holding nothing reusable go before any cached one, the lowest-numbered first:
a prompt's blocks then lie side by side in memory as far as the free ones allow, which decode
attention reads faster than scattered blocks (over 30 layers' caches at batch 32 and context
2048, 21 against 16 GB/s here). Taken in the order they were freed, blocks that decode had handed
out to many sequences in turn scattered the next prompts' tables: batch-32 steps at context 2048
after 64 sequences had decoded 330 steps took 112-114 ms that way, 105-107 this way.
"""
from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict

import torch

from sarathi_engine.config import ModelConfig
from sarathi_engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hashes(seq: Sequence, count: int, block_size: int) -> list[bytes]:
    """The keys of seq's first `count` full blocks, each a SHA-256 over the previous key and the
    block's tokens (a collision would hand one request another's KV, so not Python's hash).
    Computed once per block: the tokens of a full block never change."""
    hashes = seq.block_hashes
    while len(hashes) < count:
        start = len(hashes) * block_size
        digest = hashlib.sha256(hashes[-1] if hashes else b"")
        digest.update(array("q", seq.token_ids(start, start + block_size)).tobytes())
        hashes.append(digest.digest())
    return hashes[:count]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_caching = prefix_caching
        self._spare = list(range(num_blocks))  # unheld and uncached: a heap, taken lowest first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # unheld but cached, next taken first
        self._refs = [0] * num_blocks  # sequences holding each block
        self._key_of: dict[int, bytes] = {}  # cached blocks and their keys
        self._block_of: dict[bytes, int] = {}
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included: those are taken back when needed."""
        return len(self._spare) + len(self._cached_free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    @property
    def usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks

    def refs(self, block: int) -> int:
        return self._refs[block]

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq still needs so that its table covers its first num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that begin seq's tokens, longest run first to last. At least its last
        token is left to compute, since its logits give the next one; a request for prompt
        logprobs uses none, as those need every prompt position's logits."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        found = []
        for key in block_hashes(seq, (seq.num_tokens - 1) // self.block_size, self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def admit(self, seq: Sequence, keep_watermark: bool) -> bool:
        """Give a sequence that holds nothing its cached prefix (counted as computed) and new
        blocks for the rest of its tokens; False, changing nothing, if they do not fit (with
        the watermark kept free when asked)."""
        cached = self.cached_prefix(seq)
        revived = sum(1 for block in cached if self._refs[block] == 0)  # free now, held once admitted
        missing = blocks_for(seq.num_tokens, self.block_size) - len(cached)
        reserve = self.watermark_blocks if keep_watermark else 0
        if self.num_free_blocks - revived - missing < reserve:
            return False
        for block in cached:
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
        seq.block_table = list(cached)
        seq.num_registered_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        if self.prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
        self.grow(seq, seq.num_tokens)
        return True

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_missing(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        missing = self.blocks_missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"{missing} blocks needed for {seq}, {self.num_free_blocks} free")
        seq.block_table.extend(self._take() for _ in range(missing))

    def _take(self) -> int:
        if self._spare:
            block = heapq.heappop(self._spare)
        else:  # evicted: its tokens must be computed again by whoever needs them
            block, _ = self._cached_free.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def register_computed(self, seq: Sequence) -> None:
        """Offer seq's newly completed full blocks to the prefix cache. A block whose tokens
        another block already caches stays private: the first one computed is the one reused."""
        full = seq.num_computed_tokens // self.block_size
        if not self.prefix_caching or full <= seq.num_registered_blocks:
            return
        keys = block_hashes(seq, full, self.block_size)
        for i in range(seq.num_registered_blocks, full):
            block = seq.block_table[i]
            if keys[i] not in self._block_of and block not in self._key_of:
                self._block_of[keys[i]] = block
                self._key_of[block] = keys[i]
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Its last blocks are the least likely to be shared, so they are
        the first of its cached ones to be taken back; uncached ones go before all cached."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached_free[block] = None
                else:
                    heapq.heappush(self._spare, block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size


def bytes_per_block(cfg: ModelConfig, num_layers: int, num_kv_heads: int, block_size: int) -> int:
    element = torch.empty((), dtype=cfg.dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * cfg.head_dim * element


def allocate_kv_cache(cfg: ModelConfig, num_layers: int, layer_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[layers, 2 (key, value), *layer_shape], the layer shape being the attention backend's."""
    return torch.zeros(num_layers, 2, *layer_shape, dtype=cfg.dtype, device=device)
