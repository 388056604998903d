"""Two measurements on an idle server that turn client timings into the paper's quantities:
the decode-only iteration time (the base of a `5x` TBT SLO: Sarathi-Serve measures it at batch
32 with 4k-token contexts, scaled here like the workload) and TTFT of a prompt alone, as a line
in its length, which scheduling delay is estimated against when the server does not report it."""
from __future__ import annotations

import asyncio

import numpy as np

from sarathi_engine.bench.loadgen import Load, client_session, completion_payload, run_load, stream_completion
from sarathi_engine.bench.metrics import PrefillModel
from sarathi_engine.bench.records import RequestRecord
from sarathi_engine.bench.workloads import RequestSpec, prompt_token_ids


def decode_gaps(token_times: list[list[float]], decoding_from: list[int]) -> np.ndarray:
    """Gaps between consecutive tokens of each request from its token decoding_from[i] on, the
    first that arrived once every request was decoding. Indices, not times: each stream's times
    count from its own send, so a window in one clock cuts the others at the wrong place."""
    gaps = [np.diff(times[start:]) for times, start in zip(token_times, decoding_from)]
    return np.concatenate(gaps) if gaps else np.zeros(0)


async def measure_decode_time(url: str, model: str, batch: int, context: int, max_model_len: int,
                              num_gaps: int = 16, continuous_usage: bool = True, seed: int = 0,
                              timeout_s: float = 600) -> float:
    """Median gap while all `batch` requests decode together: streams start at once, and once every
    one has its first token (whatever order the policy prefilled them in) each gives num_gaps more
    gaps, then all are cancelled, which the server sees as disconnects."""
    if batch < 1 or num_gaps < 1:
        raise ValueError(f"decode calibration needs at least one request and one gap each (batch {batch}, "
                         f"num_gaps {num_gaps})")
    prompts = prompt_token_ids([RequestSpec(context, 1)] * batch, seed)
    max_tokens = max_model_len - context
    if max_tokens < num_gaps + 2:
        raise ValueError(f"decode calibration needs room for {num_gaps + 2} tokens after a {context}-token prompt")
    records = [RequestRecord(i, context, max_tokens, 0.0) for i in range(batch)]
    async with client_session(timeout_s) as session:
        tasks = [asyncio.create_task(stream_completion(session, url, completion_payload(model, p, max_tokens,
                                                                                      continuous_usage), r))
                 for p, r in zip(prompts, records)]
        try:
            while not all(r.token_times for r in records):
                await wait_or_fail(tasks, records)
            counts = [len(r.token_times) for r in records]
            while not all(len(r.token_times) > c + num_gaps for r, c in zip(records, counts)):
                await wait_or_fail(tasks, records)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return float(np.median(decode_gaps([r.token_times for r in records], counts)))


async def wait_or_fail(tasks: list[asyncio.Task], records: list[RequestRecord]) -> None:
    await asyncio.sleep(0.02)
    for task, record in zip(tasks, records):
        if task.done():
            raise RuntimeError(f"decode calibration request ended early: {record.error or 'finished'}")


async def measure_prefill(url: str, model: str, prompt_lens: list[int], repeats: int = 2,
                          continuous_usage: bool = True, seed: int = 0) -> PrefillModel:
    """Each length alone, one at a time; the fastest of `repeats` runs is the uncontended TTFT."""
    best = []
    for i, length in enumerate(prompt_lens):
        ttfts = []
        for r in range(repeats):
            prompt = prompt_token_ids([RequestSpec(length, 1)], seed + 100 * i + r)
            records, _ = await run_load(url, model, Load(prompt, [1], [0.0]), continuous_usage)
            if not records[0].ok:
                raise RuntimeError(f"prefill calibration failed: {records[0].error}")
            ttfts.append(records[0].ttft)
        best.append(min(ttfts))
    return PrefillModel.fit(prompt_lens, best)


def calibration_lengths(specs: list[RequestSpec], count: int = 4) -> list[int]:
    """Prompt lengths spread over the workload's range (its 10th to 95th percentiles)."""
    lens = np.array([s.prompt_len for s in specs])
    points = np.percentile(lens, np.linspace(10, 95, count)).round().astype(int)
    return sorted(set(int(p) for p in points.clip(1)))
