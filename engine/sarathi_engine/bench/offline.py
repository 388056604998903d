"""Offline figures for the engine itself: throughput against transformers' batched generate on
the same prompts, and the scheduler's cost per iteration against the model's at 128 running
sequences. Prints a table; `python -m sarathi_engine.bench.offline`."""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def transformers_seconds(folder: str, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def engine_seconds(folder: str, prompts: list[list[int]], new_tokens: int, dtype: str, budget: int) -> float:
    from sarathi_engine import LLM, SamplingParams

    llm = LLM(folder, dtype=dtype, token_budget=budget, kv_cache_memory="2GiB")
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def scheduler_share(folder: str, dtype: str, running: int = 128) -> tuple[float, float, float]:
    """Median schedule and model milliseconds of iterations with `running` decodes, and their ratio."""
    from sarathi_engine import LLM, SamplingParams

    llm = LLM(folder, dtype=dtype, token_budget=running * 64, max_num_seqs=running, kv_cache_memory="2GiB")
    llm.generate(random_prompts(running, 32, 49152, seed=1), SamplingParams(max_tokens=48, ignore_eos=True))
    full = [it for it in llm.engine.iterations if it.num_seqs == running and it.num_prefill_tokens == 0]
    schedule = statistics.median(it.schedule_time for it in full) * 1e3
    model = statistics.median(it.duration - it.schedule_time for it in full) * 1e3
    return schedule, model, schedule / model


def main(argv: list[str] | None = None) -> None:
    from sarathi_engine.model_store import resolve_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--running", type=int, default=128, help="decodes in flight for the scheduler figure")
    args = parser.parse_args(argv)
    folder = str(resolve_model(args.model))
    prompts = random_prompts(args.requests, args.prompt_len, 49152)
    generated = args.requests * args.output_len
    reference = transformers_seconds(folder, prompts, args.output_len, getattr(torch, args.dtype))
    print(f"{args.requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'system':34} {'seconds':>8} {'output tok/s':>12} {'vs transformers':>15}")
    print(f"{'transformers generate (one batch)':34} {reference:8.2f} {generated / reference:12.1f} {1.0:15.2f}")
    for budget in (512, 2048):
        ours = engine_seconds(folder, prompts, args.output_len, args.dtype, budget)
        print(f"{f'sarathi engine, budget {budget}':34} {ours:8.2f} {generated / ours:12.1f} {reference / ours:15.2f}")
    schedule, model, share = scheduler_share(folder, args.dtype, args.running)
    print(f"{args.running} running decodes: schedule {schedule:.2f} ms, model {model:.1f} ms per iteration: "
          f"scheduler = {share:.1%} of model time")


if __name__ == "__main__":
    main()
