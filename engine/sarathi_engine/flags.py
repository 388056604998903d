"""The engine's command-line flags and the config keyword arguments they give: one home for
`sarathi generate` and `sarathi serve` (cli.py, server/main.py)."""
from __future__ import annotations

import argparse

from sarathi_engine.config import POLICIES
from sarathi_engine.device import ATTENTION_BACKENDS, DEVICES
from sarathi_engine.model_store import DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} or a local Hugging Face folder")
    parser.add_argument("--policy", default="sarathi", choices=POLICIES)
    parser.add_argument("--token-budget", type=int, default=512, help="most tokens one iteration may hold")
    parser.add_argument("--max-token-budget", type=int, default=None,
                        help="the largest budget the engine warms up for and accepts live (default: --token-budget)")
    parser.add_argument("--tbt-slo-ms", type=float, default=None,
                        help="sarathi policy: size each iteration's prefill chunks so that its predicted time "
                             "stays within this time between tokens (the token budget stays the cap)")
    parser.add_argument("--slo-margin", type=float, default=1.0,
                        help="plan iterations for --tbt-slo-ms times this (the operator's autotuner moves it)")
    parser.add_argument("--min-prefill-chunk", type=int, default=16,
                        help="prompt tokens an iteration takes under --tbt-slo-ms even when its decodes fill the SLO")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: CUDA when usable, else the CPU; cuda: CUDA or exit 1 with the reason")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="auto: flash-attn where it can run (CUDA, compute capability >= 8.0, fp16/bf16), else torch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="on CUDA, the share of the GPU's memory the engine may use in all (weights, "
                             "activations at the largest batch, KV cache)")
    parser.add_argument("--kv-cache-memory", default="1GiB", help="KV cache size on CPU, e.g. 512MiB, 2GiB")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of prompt prefixes earlier requests computed, as vLLM's automatic "
                             "prefix caching (on by default; --no-prefix-caching turns it off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, policy=args.policy, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        tbt_slo_ms=args.tbt_slo_ms, slo_margin=args.slo_margin, min_prefill_chunk=args.min_prefill_chunk,
        attention_backend=args.attention_backend, gpu_memory_utilization=args.gpu_memory_utilization,
        max_token_budget=args.max_token_budget, prefix_caching=args.prefix_caching,
    )
