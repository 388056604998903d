"""Weights from a Hugging Face safetensors folder (single file or sharded with an index) into
our modules, each taking its own tensor-parallel shard and pipeline stage."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sarathi_engine.model.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARTS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj": ("self_attn.o_proj", 0),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.down_proj": ("mlp.down_proj", 0),
    "input_layernorm": ("input_layernorm", 0),
    "post_attention_layernorm": ("post_attention_layernorm", 0),
}


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return files


def targets(model: LlamaForCausalLM, name: str) -> list[tuple[nn.Module, int, str]]:
    """Where a checkpoint tensor goes in this stage: (module, part, parameter name) for each home."""
    if name == "model.embed_tokens.weight":
        homes = [model.embed_tokens]
        if model.cfg.tie_word_embeddings:
            homes.append(model.lm_head)
        return [(m, 0, "weight") for m in homes if m is not None]
    if name == "lm_head.weight":
        return [] if model.lm_head is None else [(model.lm_head, 0, "weight")]
    if name == "model.norm.weight":
        return [] if model.norm is None else [(model.norm, 0, "weight")]
    match = _LAYER.match(name)
    if not match or match.group(2) not in _LAYER_PARTS:
        return []  # e.g. rotary inv_freq buffers some checkpoints carry
    layer_id, (path, part) = int(match.group(1)), _LAYER_PARTS[match.group(2)]
    if layer_id not in model.layer_ids:
        return []
    return [(model.layers[layer_id - model.layer_ids.start].get_submodule(path), part, match.group(3))]


def load_weights(model: LlamaForCausalLM, folder: Path) -> None:
    expected = {name for name, _ in model.named_parameters()}
    owners = {id(p): name for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                for module, part, param_name in targets(model, name):
                    tensor = f.get_tensor(name)
                    load_into(module, part, param_name, tensor)
                    loaded.add(owners[id(getattr(module, param_name))])
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks weights for: {', '.join(sorted(missing)[:5])}")


def load_into(module: nn.Module, part: int, param_name: str, tensor: torch.Tensor) -> None:
    if hasattr(module, "load"):
        module.load(part, param_name, tensor)
    else:
        getattr(module, param_name).data.copy_(tensor)
