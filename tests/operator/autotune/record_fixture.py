"""Records the real engine /metrics text the aggregation tests read (fixtures/).

Starts `sarathi serve` with the bundled SmolLM2, planning every iteration for a TBT SLO, streams two batches of requests through the
benchmark's load generator, scraping /metrics before and after each; then restarts the server
(its counters start again from zero) and serves a third batch. truth.json holds what the client
saw per batch: requests, output tokens, and its own P99 of the gaps between tokens; and what the
engine's admin API reports its SLO planner counted over the batch: limited and infeasible
iterations (the admin API's totals include the start-up calibration, which /metrics leaves out).

    .venv/bin/python tests/operator/autotune/record_fixture.py
"""

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np

from sarathi_engine.bench import arrivals, loadgen, workloads
from sarathi_engine.server.launcher import ServerProcess

OUT = Path(__file__).parent / "fixtures"
MODEL = "smollm2-135m-instruct"


TOKEN = "fixture-token"


def planner_counts(server: ServerProcess) -> dict:
    request = urllib.request.Request(server.url + "/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        planning = json.loads(response.read())["slo_planning"]
    return {"limited": planning["limited_iterations"], "infeasible": planning["infeasible_iterations"]}


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return response.read().decode()


def batch(server: ServerProcess, seed: int, n: int = 12, qps: float = 2.0) -> dict:
    specs = workloads.scale_and_clip(workloads.sample_lengths(workloads.WORKLOADS["sharegpt4"], n, seed), 0.06, 1024)
    load = loadgen.Load(workloads.prompt_token_ids(specs, seed), [s.output_len for s in specs],
                        list(arrivals.arrival_times(n, qps, seed)))
    records, _ = asyncio.run(loadgen.run_load(server.url, MODEL, load, continuous_usage=False))
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    gaps = np.concatenate([r.tbts for r in records])
    return {"requests": n, "output_tokens": sum(len(r.token_times) for r in records),
            "tbt_samples": int(gaps.size), "client_tbt_p99": float(np.percentile(gaps, 99)),
            "client_ttft_p99": float(np.percentile([r.ttft for r in records], 99))}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    args = ["--model", MODEL, "--token-budget", "64", "--max-model-len", "1024", "--kv-cache-memory", "256MiB",
            "--tbt-slo-ms", "60", "--slo-margin", "0.9"]
    env = {"OMP_NUM_THREADS": "1", "SARATHI_ADMIN_TOKEN": TOKEN}
    truth = {}

    def served(server: ServerProcess, name: str, seed: int, fixture: str) -> None:
        before = planner_counts(server)
        truth[name] = batch(server, seed)
        after = planner_counts(server)
        truth[name]["planner"] = {k: after[k] - before[k] for k in after}
        (OUT / fixture).write_text(scrape(server))

    with ServerProcess(args, env=env) as server:
        (OUT / "fresh.txt").write_text(scrape(server))
        served(server, "a", 1, "after-a.txt")
        served(server, "b", 2, "after-b.txt")
    with ServerProcess(args, env=env) as server:
        served(server, "c", 3, "restarted-after-c.txt")
    (OUT / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(json.dumps(truth, indent=2))


if __name__ == "__main__":
    main()
