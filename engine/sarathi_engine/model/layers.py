"""Building blocks of the decoder: RMSNorm, rotary embedding, SwiGLU, and linears that shard
themselves across tensor-parallel ranks when their weights are loaded."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sarathi_engine.distributed import parallel_state, tp_all_reduce, tp_gather_last_dim


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of x; with a residual, residual += x first (in place) and the norm of that."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(residual, x, self.weight, self.eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate the two halves), cos/sin cached in float32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, ops) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.ops = ops
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary(positions, q, k, self.cos, self.sin)


class LinearBase(nn.Module):
    """A layer with a linear product through the model's ops: `weight` is [out, in] as checkpoints
    store it, and `prepare()` hands it to the ops once loaded (the CPU kernels pack it)."""

    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops
        self.prepared = None
        self.shares_weight = False  # a tied LM head: its weight is also the embedding's

    def prepare(self) -> None:
        self.prepared = self.ops.prepare_weight(self.weight)
        if self.prepared is not self.weight and not self.shares_weight:
            self.weight.data = self.weight.data.new_empty(0)  # the ops keep their own copy

    def product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.linear(x, self.prepared, bias)


class ShardedLinear(LinearBase):
    """A linear whose weight holds several logical parts side by side (q|k|v, gate|up), each
    part cut along its output rows for this rank; `load(part, weight)` copies one part in."""

    def __init__(self, input_size: int, parts: list[range], bias: bool, ops) -> None:
        # parts: the rows of each full checkpoint tensor that this rank holds
        super().__init__(ops)
        self.parts = parts
        rows = sum(len(r) for r in parts)
        self.weight = nn.Parameter(torch.empty(rows, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(rows), requires_grad=False) if bias else None

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        rows = self.parts[part]
        offset = sum(len(r) for r in self.parts[:part])
        target = self.weight if name == "weight" else self.bias
        target.data[offset : offset + len(rows)].copy_(tensor[rows.start : rows.stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)


def even_split(n: int, parts: int, index: int) -> range:
    """The index-th of `parts` contiguous pieces of range(n), sizes differing by at most one;
    earlier pieces take the remainder."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def scaled(r: range, factor: int) -> range:
    return range(r.start * factor, r.stop * factor)


@dataclass(frozen=True)
class HeadShard:
    heads: range  # query heads this rank computes
    kv_heads: range  # the key/value heads they attend with


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """Query heads go to ranks in whole KV groups, as evenly as possible: SmolLM2's 9 heads in 3
    groups over 2 ranks become 6 and 3. With fewer KV heads than ranks, each KV head is replicated
    on tp_size / num_kv_heads ranks, which split its group's query heads evenly."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        groups = even_split(num_kv_heads, tp_size, tp_rank)
        return HeadShard(scaled(groups, group), groups)
    replicas = tp_size // num_kv_heads
    if tp_size % num_kv_heads or group % replicas:
        raise ValueError(
            f"{num_heads} attention heads with {num_kv_heads} KV heads cannot be split over tensor-parallel "
            f"size {tp_size}: with fewer KV heads than ranks, each KV head must be replicated on a whole number "
            f"of ranks that split its {group} query heads evenly"
        )
    per_rank = group // replicas
    kv = tp_rank // replicas
    return HeadShard(range(tp_rank * per_rank, (tp_rank + 1) * per_rank), range(kv, kv + 1))


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[list[range], HeadShard]:
    """Rows of q, k and v this rank holds, and its heads."""
    state = parallel_state()
    shard = head_shard(num_heads, num_kv_heads, state.tp_size, state.tp_rank)
    kv = scaled(shard.kv_heads, head_dim)
    return [scaled(shard.heads, head_dim), kv, kv], shard


def column_part(size: int) -> range:
    state = parallel_state()
    return even_split(size, state.tp_size, state.tp_rank)


class RowParallelLinear(LinearBase):
    """Input features split across ranks (`columns`, this rank's share); partial outputs summed by all-reduce."""

    def __init__(self, columns: range, output_size: int, ops, bias: bool = False) -> None:
        super().__init__(ops)
        self.columns = columns
        self.weight = nn.Parameter(torch.empty(output_size, len(columns)), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        if name == "bias":
            self.bias.data.copy_(tensor)
        else:
            self.weight.data.copy_(tensor[:, self.columns.start : self.columns.stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(self.product(x))  # the bias is added once, to the sum
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(LinearBase):
    """Embedding rows split across ranks in equal shards (the last padded with zero rows, so that
    gathered shards line up); each rank looks up its own rows and all-reduce fills in the rest.
    As the LM head, the same rows make the logits."""

    def __init__(self, vocab_size: int, hidden_size: int, ops) -> None:
        super().__init__(ops)
        state = parallel_state()
        self.vocab_size = vocab_size
        self.tp_size = state.tp_size
        self.rows = -(-vocab_size // state.tp_size)
        self.first = state.tp_rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        shard = tensor[self.first : self.first + self.rows]
        self.weight.data[: len(shard)].copy_(shard)

    def prepare(self) -> None:
        """Nothing: rows are looked up, never multiplied."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.ops.embed(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        x = self.ops.embed(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    prepare = LinearBase.prepare

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full logits on tensor-parallel rank 0, None on the others."""
        logits = tp_gather_last_dim(self.product(hidden))
        return None if logits is None else logits[..., : self.vocab_size]

