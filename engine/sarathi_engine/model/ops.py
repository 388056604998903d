"""The decoder's per-layer arithmetic behind one interface, chosen once per model.

`TorchOps` is plain PyTorch in the model's dtype, step for step as transformers computes it: the
reference, and the path on CUDA or wherever the CPU kernels cannot run. `CpuKernelOps` runs the C++
kernels of sarathi_engine.kernels: weights stay in the checkpoint's dtype, packed once for the
GEMM, and activations are float32 between layers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    def __init__(self, dtype: torch.dtype) -> None:
        self.activation_dtype = dtype

    def prepare_weight(self, weight: torch.Tensor):
        """What linear() takes for a loaded [out, in] weight."""
        return weight

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, exactly as transformers does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    def add_rms_norm(self, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x in place, then the norm of the new residual."""
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's first maximal index: the greedy choice."""
        return logits.argmax(dim=-1)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding; cos and sin are float32 [positions, head_dim]."""
        cos = cos[positions].unsqueeze(1).to(q.dtype)
        sin = sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


    def attention_input(self, hidden: torch.Tensor, pending: torch.Tensor | None, norm, qkv, rotary,
                        positions: torch.Tensor, num_heads: int, num_kv_heads: int):
        """(hidden += pending), the input norm, the qkv projection and rotary: q, k and v as
        [tokens, heads, head_dim]."""
        x = norm(hidden) if pending is None else norm(pending, residual=hidden)
        out = qkv(x)
        head_dim = out.shape[-1] // (num_heads + 2 * num_kv_heads)
        q, k, v = out.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k = rotary(positions, q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim))
        return q, k, v.view(-1, num_kv_heads, head_dim)

    def attention_output(self, heads: torch.Tensor, o_proj, hidden: torch.Tensor, norm, mlp) -> torch.Tensor:
        """The o projection, hidden += it, the post-attention norm and the MLP: the MLP's output,
        which the next layer (or the final norm) adds to hidden."""
        return mlp(norm(o_proj(heads), residual=hidden))

    def decoder_stack(self, layers) -> None:
        """The stage's layers as one call (see CpuKernelOps), or None where the ops run them one
        module at a time."""
        return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CpuKernelOps(TorchOps):
    name = "cpu-kernels"

    def __init__(self, dtype: torch.dtype) -> None:
        from sarathi_engine.distributed import parallel_state

        super().__init__(torch.float32)
        self.ops = torch.ops.sarathi
        self.tp_size = parallel_state().tp_size

    def prepare_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.ops.pack_linear_weight(weight), weight.shape[0]

    def linear(self, x: torch.Tensor, weight: tuple[torch.Tensor, int], bias: torch.Tensor | None) -> torch.Tensor:
        packed, out_features = weight
        return self.ops.linear(x, packed, out_features, bias)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight).float()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.rms_norm(x, weight, eps)

    def add_rms_norm(self, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.add_rms_norm(residual, x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_mul(gate_up)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.ops.argmax_rows(logits)

    def rotary(self, positions, q, k, cos, sin):
        self.ops.rotary_(q, k, positions, cos, sin)
        return q, k

    def attention_input(self, hidden, pending, norm, qkv, rotary, positions, num_heads, num_kv_heads):
        return self.ops.attention_input(hidden, pending, norm.weight, norm.eps, *qkv.prepared, qkv.bias, positions,
                                        rotary.cos, rotary.sin, num_heads, num_kv_heads)

    def fuses_output(self, o_proj) -> bool:
        """Whether attention_output runs as one kernel call: not where tensor parallelism sums
        partial products after o_proj, nor with an o_proj bias."""
        return self.tp_size == 1 and o_proj.bias is None

    def attention_output(self, heads, o_proj, hidden, norm, mlp):
        if not self.fuses_output(o_proj):
            return super().attention_output(heads, o_proj, hidden, norm, mlp)
        return self.ops.attention_output(heads, *o_proj.prepared, hidden, norm.weight, norm.eps,
                                         *mlp.gate_up_proj.prepared, *mlp.down_proj.prepared)

    def decoder_stack(self, layers):
        """A torch.classes.sarathi.DecoderStack holding the layers' packed weights, whose forward
        runs them all in one call, where the layers are the kernels' end to end: fused
        attention_output calls and the kernels' attention, prefill included."""
        attention = [layer.self_attn for layer in layers]
        first = attention[0]
        if (first.backend.name != "cpu-kernels" or not first.backend.prefills_in_place(first.head_dim)
                or not all(self.fuses_output(a.o_proj) for a in attention)):
            return None
        eps = {norm.eps for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)}
        if len(eps) > 1:
            return None
        stack = torch.classes.sarathi.DecoderStack(first.rotary.cos, first.rotary.sin, first.num_heads,
                                                   first.num_kv_heads, eps.pop(), first.scale)
        for layer, a in zip(layers, attention):
            stack.add_layer(layer.input_layernorm.weight, *a.qkv_proj.prepared, a.qkv_proj.bias, *a.o_proj.prepared,
                            layer.post_attention_layernorm.weight, *layer.mlp.gate_up_proj.prepared,
                            *layer.mlp.down_proj.prepared, a.sliding_window or 0)
        return stack


def select_ops(device: torch.device, dtype: torch.dtype, head_dim: int) -> TorchOps:
    """The C++ kernels on a CPU that can run them (unless SARATHI_CPU_KERNELS=0), plain torch
    everywhere else."""
    wanted = os.environ.get("SARATHI_CPU_KERNELS", "1") != "0"
    if wanted and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim % 8 == 0:
        from sarathi_engine import kernels

        if kernels.load() is None:
            return CpuKernelOps(dtype)
    return TorchOps(dtype)
