"""Where an iteration's time goes: torch.profiler over decode-only and prefill-only iterations of
the offline engine, printed as a per-op table (self CPU time, share of the total, calls).
`python -m sarathi_engine.bench.profile --batch 32 --context 512`."""
from __future__ import annotations

import argparse
import time

import torch

from sarathi_engine.bench.offline import random_prompts


def step_until_decoding(llm, request_ids: list[str]) -> None:
    """Step until every request has its first token: all that is left is decoding."""
    seen: set[str] = set()
    while len(seen) < len(request_ids):
        seen.update(o.request_id for o in llm.engine.step() if o.token_ids)


def profile_steps(llm, steps: int, row_limit: int) -> tuple[str, float]:
    """The per-op table of `steps` engine steps and their mean wall time in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        wall = (time.perf_counter() - start) / steps * 1e3
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit), wall


def main(argv: list[str] | None = None) -> None:
    from sarathi_engine import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1, help="decodes in the decode-only iterations")
    parser.add_argument("--context", type=int, default=256, help="their prompt length")
    parser.add_argument("--chunk", type=int, default=512, help="token budget of the prefill-only iterations")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    llm = LLM(args.model, dtype=args.dtype, token_budget=max(args.chunk, args.batch), kv_cache_memory="2GiB",
              max_num_seqs=max(args.batch, 1))
    ids = [f"p{i}" for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps * 4 + 8, ignore_eos=True)
    for request_id, prompt in zip(ids, random_prompts(args.batch, args.context, llm.engine.model_config.vocab_size)):
        llm.engine.add_request(request_id, prompt, params)
    step_until_decoding(llm, ids)
    llm.engine.step()  # one untimed decode step
    table, wall = profile_steps(llm, args.steps, args.rows)
    print(f"decode-only: batch {args.batch}, context {args.context}, {args.dtype}, {torch.get_num_threads()} threads: "
          f"{wall:.1f} ms per step")
    print(table)
    for request_id in ids:
        llm.engine.abort_request(request_id)
    llm.engine.step()
    # One untimed chunk and `steps` timed ones, within the context the engine allows.
    chunks = min(args.steps + 1, (llm.engine.config.scheduler.max_model_len - 1) // args.chunk)
    prompt_len = args.chunk * chunks
    llm.engine.add_request("prefill", random_prompts(1, prompt_len, llm.engine.model_config.vocab_size, 1)[0],
                           SamplingParams(max_tokens=1))
    llm.engine.step()  # its first chunk attends to nothing cached; the profiled ones do
    table, wall = profile_steps(llm, chunks - 1, args.rows)
    print(f"prefill-only: chunks of {args.chunk} tokens of a {prompt_len}-token prompt: {wall:.1f} ms per step, "
          f"{args.chunk / wall * 1e3:.0f} tokens/s")
    print(table)


if __name__ == "__main__":
    main()
