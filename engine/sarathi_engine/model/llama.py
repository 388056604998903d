"""The Llama-family decoder (Llama, Mistral, Qwen2): one class, configured by ModelConfig.

forward() takes the flat token run of a mixed batch; under pipeline parallelism a stage holds
only its own layers and passes hidden states to the next. The first stage holds the embedding
and the LM head, the last the final norm: the last stage sends only the normed rows to be
sampled back to the first, where rank 0 samples.
"""
from __future__ import annotations

import torch
from torch import nn

from sarathi_engine.attention import AttentionBackend, AttentionMetadata
from sarathi_engine.config import ModelConfig
from sarathi_engine.distributed import parallel_state
from sarathi_engine.model.layers import (
    LinearBase,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    ShardedLinear,
    VocabParallelEmbedding,
    column_part,
    even_split,
    head_shard,
    qkv_parts,
    scaled,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops, layer: int) -> None:
        super().__init__()
        parts, shard = qkv_parts(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.num_heads, self.num_kv_heads = len(shard.heads), len(shard.kv_heads)
        self.head_dim = cfg.head_dim
        self.qkv_proj = ShardedLinear(cfg.hidden_size, parts, cfg.qkv_bias, ops)
        self.o_proj = RowParallelLinear(scaled(shard.heads, cfg.head_dim), cfg.hidden_size, ops)
        self.rotary = rotary
        self.backend = backend
        self.ops = ops
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.layer_windows[layer]
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner once memory is sized

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, pending: torch.Tensor | None, norm: RMSNorm,
                meta: AttentionMetadata) -> torch.Tensor:
        """From the residual stream (hidden += pending, normed) to the heads' output over the
        cache, [tokens, heads * head_dim], before o_proj."""
        q, k, v = self.ops.attention_input(hidden, pending, norm, self.qkv_proj, self.rotary, positions,
                                           self.num_heads, self.num_kv_heads)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.flatten(1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops) -> None:
        super().__init__()
        part = column_part(cfg.intermediate_size)
        self.ops = ops
        self.gate_up_proj = ShardedLinear(cfg.hidden_size, [part, part], False, ops)
        self.down_proj = RowParallelLinear(part, cfg.hidden_size, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops, layer: int) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, rotary, backend, ops, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                pending: torch.Tensor | None = None) -> torch.Tensor:
        """hidden is the residual stream, updated in place; pending, the previous layer's MLP
        output not yet added to it. Returns this layer's MLP output: the next one's pending."""
        heads = self.self_attn(positions, hidden, pending, self.input_layernorm, meta)
        return self.ops.attention_output(heads, self.self_attn.o_proj, hidden, self.post_attention_layernorm, self.mlp)


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Contiguous layers of one pipeline stage; earlier stages take the remainder."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline-parallel size {pp_size} is larger than the model's {num_layers} layers")
    return even_split(num_layers, pp_size, pp_rank)


def check_layout(cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Raise, naming the numbers, if the model cannot be laid out over tp_size x pp_size ranks."""
    for size, name in ((tp_size, "tensor"), (pp_size, "pipeline")):
        if size < 1:
            raise ValueError(f"{name}-parallel size must be at least 1, got {size}")
    stage_layers(cfg.num_layers, pp_size, 0)
    head_shard(cfg.num_heads, cfg.num_kv_heads, tp_size, 0)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, ops) -> None:
        super().__init__()
        state = parallel_state()
        self.cfg = cfg
        self.layer_ids = stage_layers(cfg.num_layers, state.pp_size, state.pp_rank)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, ops)
        first, last = state.is_first_stage, state.is_last_stage
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ops) if first else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ops) if first else None
        if self.lm_head is not None and cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            self.lm_head.shares_weight = True
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend, ops, layer) for layer in self.layer_ids)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops) if last else None
        self.ops = ops
        self.stack = None  # the layers as one call, where the ops have one: set by prepare()
        self.caches: list[torch.Tensor] = []  # every layer's key and value cache in turn: bind_caches()

    def prepare(self) -> None:
        """Hand the loaded weights to the ops (the CPU kernels pack them)."""
        for module in self.modules():
            if isinstance(module, LinearBase):
                module.prepare()
        self.stack = self.ops.decoder_stack(list(self.layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids on the first stage, the previous stage's hidden states on the others."""
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids)
        if self.stack is not None:
            pending = self.stack.forward(hidden, positions, self.caches, meta.slot_mapping, meta.block_tables,
                                         meta.context_lens_tensor, meta.query_lens, meta.num_prefills)
        else:
            pending = None
            for layer in self.layers:
                pending = layer(positions, hidden, meta, pending)
        if self.norm is not None:
            return self.norm(pending, residual=hidden)
        return hidden.add_(pending)  # the next stage receives the whole residual stream

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits of the last stage's normed rows, on tensor-parallel rank 0 of the first
        stage (None on the other ranks, which only contribute their vocabulary shard)."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def bind_caches(self, kv_cache: torch.Tensor | None) -> None:
        """Point every attention layer at its slice of this [layers, 2, ...] cache (None: at
        nothing)."""
        for layer, module in enumerate(self.attention_layers()):
            module.k_cache, module.v_cache = (torch.empty(0),) * 2 if kv_cache is None else kv_cache[layer]
        self.caches = [cache for a in self.attention_layers() for cache in (a.k_cache, a.v_cache)]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]
