"""Two measurements on an idle server that turn client timings into the paper's quantities:
the decode-only iteration time (the base of a `5x` TBT SLO: Sarathi-Serve measures it at batch
32 with 4k-token contexts, scaled here like the workload) and TTFT of a prompt alone, as a line
in its length, which scheduling delay is estimated against when the server does not report it."""
from __future__ import annotations

import numpy as np

from sarathi_engine.bench.loadgen import Load, run_load
from sarathi_engine.bench.metrics import PrefillModel
from sarathi_engine.bench.records import RequestRecord
from sarathi_engine.bench.workloads import RequestSpec, prompt_token_ids

SKIP_GAPS = 4  # the first gaps of a request may still share iterations with other prompts' prefills

def decode_time_from(records: list[RequestRecord]) -> float:
    """Median gap between tokens once every request is decoding."""
    gaps = np.concatenate([r.tbts[SKIP_GAPS:] for r in records if r.ok])
    if gaps.size == 0:
        raise RuntimeError("decode calibration produced no token gaps")
    return float(np.median(gaps))

async def measure_decode_time(url: str, model: str, batch: int, context: int, output: int = 32,
                              continuous_usage: bool = True, seed: int = 0) -> float:
    prompts = prompt_token_ids([RequestSpec(context, output)] * batch, seed)
    records, _ = await run_load(url, model, Load(prompts, [output] * batch, [0.0] * batch), continuous_usage)
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"decode calibration failed: {failed[0]}")
    return decode_time_from(records)

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

