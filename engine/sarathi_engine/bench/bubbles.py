"""Pipeline bubbles per batching policy: run the same requests, arriving at the same times,
through a pipeline-parallel engine under each policy and print, from the busy time each rank
records, how much of its stage's time it sat idle.

    python -m sarathi_engine.bench.bubbles --pipeline-parallel-size 2 --policies sarathi vllm --qps 0.6

Bubble share = sum over stages of (span - busy) / sum of spans, where a stage's span runs from
the start of its first piece of model work to the end of its last. Time when no request was
there at all also counts as idle, so it is printed too ("empty"): pick a rate that keeps the
engine busy, or --qps inf to queue every request at once.
"""
from __future__ import annotations

import argparse
import time

from sarathi_engine import SamplingParams
from sarathi_engine.bench.arrivals import arrival_times
from sarathi_engine.bench.workloads import WORKLOADS, prompt_token_ids, sample_lengths, scale_and_clip
from sarathi_engine.config import POLICIES, make_engine_config
from sarathi_engine.engine import LLMEngine
from sarathi_engine.model_store import DEFAULT_MODEL
from sarathi_engine.pipeline import StageTiming, bubble_share


def run_policy(args: argparse.Namespace, policy: str, prompts: list[list[int]], params: list[SamplingParams],
               arrivals: list[float]) -> tuple[list[StageTiming], float, float]:
    """Stage timings, wall time and the time the engine had no request at all."""
    engine = LLMEngine(make_engine_config(
        args.model, policy=policy, token_budget=args.token_budget, dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
    ))
    try:
        empty, i = 0.0, 0
        start = time.monotonic()
        while i < len(prompts) or engine.has_unfinished_requests():
            now = time.monotonic() - start
            while i < len(prompts) and arrivals[i] <= now:
                engine.add_request(f"r{i}", prompts[i], params[i])
                i += 1
            if engine.has_unfinished_requests():
                engine.step()
            else:
                empty += arrivals[i] - now
                time.sleep(arrivals[i] - now)
        return engine.stage_timings(), time.monotonic() - start, empty
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policies", nargs="+", default=["sarathi", "vllm"], choices=POLICIES)
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--token-budget", type=int, default=128)
    parser.add_argument("--workload", default="sharegpt4", choices=sorted(WORKLOADS))
    parser.add_argument("--scale", type=float, default=0.05, help="multiply every length (small on a CPU)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--qps", type=float, default=float("inf"), help="Poisson arrival rate; inf: all at once")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    specs = scale_and_clip(sample_lengths(WORKLOADS[args.workload], args.num_requests, args.seed), args.scale,
                           args.max_model_len)
    prompts = prompt_token_ids(specs, args.seed)
    params = [SamplingParams(max_tokens=s.output_len, ignore_eos=True) for s in specs]
    arrivals = arrival_times(len(specs), args.qps, args.seed).tolist()
    print(f"{len(specs)} requests from {args.workload} x {args.scale}: {sum(s.prompt_len for s in specs)} prompt "
          f"and {sum(s.output_len for s in specs)} output tokens; PP={args.pipeline_parallel_size}, "
          f"TP={args.tensor_parallel_size}, token budget {args.token_budget}, {args.qps} requests/s")
    print(f"{'policy':<18}{'stage':>6}{'busy s':>9}{'span s':>9}{'idle':>8}")
    for policy in args.policies:
        timings, elapsed, empty = run_policy(args, policy, prompts, params, arrivals)
        for t in timings:
            print(f"{policy:<18}{t.stage:>6}{t.busy:>9.2f}{t.span:>9.2f}{t.idle_share:>8.1%}  rank {t.rank}")
        print(f"{policy:<18}bubble share {bubble_share(timings):.1%}, wall {elapsed:.1f} s, empty {empty:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
