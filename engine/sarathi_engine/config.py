"""Engine settings: one dataclass per concern (model, cache, scheduler, parallel)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
POLICIES = ("sarathi", "vllm", "orca", "fastertransformer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    layer_windows: tuple[int | None, ...]  # each layer's sliding window (None: full attention)
    dtype: torch.dtype

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: str = "auto") -> ModelConfig:
        architecture = (hf.get("architectures") or ["?"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        quantization = hf.get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "unnamed") if isinstance(quantization, dict) else "unnamed"
            raise ValueError(f"config.json has a quantization_config (quant_method {method!r}): quantized "
                             "checkpoints are not supported; their weights would load as if they were not quantized")
        # transformers 5 writes rope settings under rope_parameters; older configs use rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = hf["num_attention_heads"]
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=architecture == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
            layer_windows=layer_windows(hf, architecture),
            dtype=resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype")),
        )

    @classmethod
    def from_folder(cls, folder: Path, dtype: str = "auto") -> ModelConfig:
        return cls.from_hf_config(json.loads((folder / "config.json").read_text()), dtype)


def layer_windows(hf: dict, architecture: str) -> tuple[int | None, ...]:
    """Each layer's sliding window, as transformers reads the config: Mistral slides in every
    layer; Qwen2 only with use_sliding_window, in the layers `layer_types` names
    "sliding_attention", or else from layer max_window_layers on (the ones below attend fully)."""
    window, layers = hf.get("sliding_window"), hf["num_hidden_layers"]
    if window is None or (architecture == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False)):
        return (None,) * layers
    if architecture != "Qwen2ForCausalLM":
        return (window,) * layers
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
                                      for i in range(layers)]
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def resolve_dtype(requested: str, config_dtype: str | None) -> torch.dtype:
    if requested == "auto":
        return DTYPES.get(config_dtype or "float32", torch.float32)
    if requested not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {requested!r}")
    return DTYPES[requested]


@dataclass
class CacheConfig:
    """The paged KV cache: block size and how much memory it may take."""

    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes, on CPU
    # On CUDA: the share of the GPU's memory the engine may use in all (weights, the activations
    # of the largest batch as the warm-up measured them, KV cache), as vLLM's flag of that name.
    gpu_memory_utilization: float = 0.9
    watermark: float = 0.01  # share of blocks kept free when admitting new requests
    prefix_caching: bool = True  # reuse the KV of full blocks whose tokens an earlier request computed

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


@dataclass
class SchedulerConfig:
    """Batching policy and its limits. The token budget may change while the engine runs."""

    policy: str = "sarathi"
    token_budget: int = 512
    max_num_seqs: int = 128
    max_model_len: int | None = None  # None: the model's own context length
    # The sarathi policy's per-iteration planning: prefill chunks sized so the predicted
    # iteration time stays within this TBT (None: the token budget alone decides).
    tbt_slo_ms: float | None = None
    # The planner aims at tbt_slo_ms x slo_margin: the operator's outer loop moves the margin to
    # correct the bias between predicted iteration times and the P99 TBT clients observe.
    slo_margin: float = 1.0
    min_prefill_chunk: int = 16  # what prefill gets per iteration even when the decodes fill the SLO
    # The largest token budget the engine warms up for (and so, on CUDA, reserves activation
    # memory for); a live budget above it is refused. None: the starting token_budget.
    max_token_budget: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        check_token_budget(self.token_budget)
        if self.max_token_budget is None:
            self.max_token_budget = self.token_budget
        check_positive_int("max_token_budget", self.max_token_budget)
        if self.token_budget > self.max_token_budget:
            raise ValueError(f"token_budget {self.token_budget} is above max_token_budget {self.max_token_budget}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        check_tbt_slo_ms(self.tbt_slo_ms)
        if self.tbt_slo_ms is not None and self.policy != "sarathi":
            raise ValueError(f"tbt_slo_ms plans the sarathi policy's chunks; policy {self.policy!r} does not chunk")
        check_slo_margin(self.slo_margin)
        check_positive_int("min_prefill_chunk", self.min_prefill_chunk)

    @property
    def max_batched_tokens_unchunked(self) -> int:
        """Per-iteration limit for policies that never split a prompt: a whole prompt must fit."""
        return max(self.token_budget, self.max_model_len or 0)

    def largest_batches(self, max_model_len: int) -> list[list[int]]:
        """The largest batches this configuration can schedule, as the new tokens of each of
        their sequences (none cached before): the most prefill tokens (the budget; a whole
        prompt under the policies that never chunk), and the most decodes. The warm-up runs them."""
        longest = max_model_len - 1  # a prompt leaves room for one output token
        chunks = self.policy == "sarathi"
        tokens = self.max_token_budget if chunks else max(self.max_token_budget, longest)
        prefill = [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])
        decodes = min(self.max_num_seqs, self.max_token_budget) if chunks else self.max_num_seqs
        return [prefill[:self.max_num_seqs], [1] * decodes]


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_token_budget(value: object) -> int:
    return check_positive_int("token_budget", value)


MAX_TBT_SLO_MS = 3_600_000.0  # an hour: anything longer is a mistake, not an SLO


def check_tbt_slo_ms(value: object) -> float | None:
    """None (no SLO) or a positive number of milliseconds up to an hour."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TBT_SLO_MS:
        raise ValueError(f"tbt_slo_ms must be a number of milliseconds in (0, {MAX_TBT_SLO_MS:.0f}], got {value!r}")
    return float(value)


MIN_SLO_MARGIN, MAX_SLO_MARGIN = 0.1, 2.0


def check_slo_margin(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_SLO_MARGIN <= value <= MAX_SLO_MARGIN:
        raise ValueError(f"slo_margin must be a number in [{MIN_SLO_MARGIN}, {MAX_SLO_MARGIN}], got {value!r}")
    return float(value)


@dataclass
class ParallelConfig:
    """Tensor- and pipeline-parallel degrees."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class EngineConfig:
    """Everything an engine needs to start."""

    model: str
    dtype: str = "auto"
    device: str = "auto"  # auto, cuda or cpu (sarathi_engine.device)
    attention_backend: str = "auto"  # auto, flash-attn or torch
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def make_engine_config(model: str, policy: str = "sarathi", token_budget: int = 512, max_num_seqs: int = 128,
                       max_model_len: int | None = None, dtype: str = "auto", device: str = "auto",
                       kv_cache_memory: str | int = "1GiB", block_size: int = 16, seed: int = 0,
                       tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                       tbt_slo_ms: float | None = None, slo_margin: float = 1.0,
                       min_prefill_chunk: int = 16, attention_backend: str = "auto",
                       gpu_memory_utilization: float = 0.9, max_token_budget: int | None = None,
                       prefix_caching: bool = True) -> EngineConfig:
    """The engine settings from the flat keyword arguments that LLM(...) and the CLI share."""
    return EngineConfig(
        model=model, dtype=dtype, device=device, attention_backend=attention_backend, seed=seed,
        cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_memory_size(kv_cache_memory),
                          gpu_memory_utilization=gpu_memory_utilization, prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(policy=policy, token_budget=token_budget, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, tbt_slo_ms=tbt_slo_ms,
                                  slo_margin=slo_margin, min_prefill_chunk=min_prefill_chunk,
                                  max_token_budget=max_token_budget),
        parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size),
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_memory_size(text: str | int) -> int:
    """'2GiB', '512M', '1073741824' -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"memory size must look like 512MiB or 2GiB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
