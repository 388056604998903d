"""Building blocks of the decoder: RMSNorm, rotary embedding, SwiGLU, and linears that shard
themselves across tensor-parallel ranks when their weights are loaded."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sarathi_engine.distributed import parallel_state, tp_all_gather_last_dim, tp_all_reduce


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, exactly as transformers does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ShardedLinear(nn.Module):
    """A linear whose weight holds several logical parts side by side (q|k|v, gate|up), each
    part cut along its output rows for this rank; `load(part, weight)` copies one part in."""

    def __init__(self, input_size: int, parts: list[tuple[int, int]], bias: bool) -> None:
        # parts: (rows this rank holds, first row of the full checkpoint tensor it holds)
        super().__init__()
        self.parts = parts
        rows = sum(n for n, _ in parts)
        self.weight = nn.Parameter(torch.empty(rows, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(rows), requires_grad=False) if bias else None

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        rows, first = self.parts[part]
        offset = sum(n for n, _ in self.parts[:part])
        target = self.weight if name == "weight" else self.bias
        target.data[offset : offset + rows].copy_(tensor[first : first + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def column_parts(sizes: list[int]) -> list[tuple[int, int]]:
    state = parallel_state()
    for size in sizes:
        if size % state.tp_size:
            raise ValueError(f"size {size} is not divisible by tensor-parallel size {state.tp_size}")
    return [(size // state.tp_size, state.tp_rank * size // state.tp_size) for size in sizes]


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[list[tuple[int, int]], int, int]:
    """Rows of q, k and v this rank holds, and its local head counts. KV heads are replicated
    when there are fewer of them than ranks."""
    state = parallel_state()
    tp, rank = state.tp_size, state.tp_rank
    if num_heads % tp:
        raise ValueError(f"{num_heads} attention heads are not divisible by tensor-parallel size {tp}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be split over or replicated to tensor-parallel size {tp}")
    heads = num_heads // tp
    kv_heads = max(1, num_kv_heads // tp)
    first_kv = rank * num_kv_heads // tp  # the KV head that this rank's query heads attend with
    kv = (kv_heads * head_dim, first_kv * head_dim)
    return [(heads * head_dim, rank * heads * head_dim), kv, kv], heads, kv_heads


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial outputs summed by all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        state = parallel_state()
        self.rows_per_rank = input_size // state.tp_size
        self.first = state.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(output_size, self.rows_per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        if name == "bias":
            self.bias.data.copy_(tensor)
        else:
            self.weight.data.copy_(tensor[:, self.first : self.first + self.rows_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; each rank looks up its own and all-reduce fills the rest."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        state = parallel_state()
        (self.rows, self.first), = column_parts([vocab_size])
        self.tp_size = state.tp_size
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def load(self, part: int, name: str, tensor: torch.Tensor) -> None:
        self.weight.data.copy_(tensor[self.first : self.first + self.rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last_dim(F.linear(hidden, self.weight))
