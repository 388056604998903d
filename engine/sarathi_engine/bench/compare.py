"""A benchmark session over targets: our server started once per policy and token budget, and
peers given by URL, each driven with the same workload and seed at the same request rates, with
optional capacity search under one TBT SLO (resolved once, on the first target, when given as a
multiple of the decode-only iteration time). Results are saved after every target."""
from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sarathi_engine.bench.calibrate import measure_decode_time
from sarathi_engine.bench.capacity import TbtSlo
from sarathi_engine.bench.experiment import WorkloadSpec, connect, find_capacity, run_point
from sarathi_engine.bench.progress import BenchProgress
from sarathi_engine.bench.report import capacity_table, plot, points_table, write_json
from sarathi_engine.config import POLICIES
from sarathi_engine.server.launcher import ServerProcess


@dataclass(frozen=True)
class Target:
    label: str
    policy: str | None = None  # ours, started here
    token_budget: int | None = None
    url: str | None = None  # a peer already running


def parse_policy_target(text: str, default_budget: int = 512) -> Target:
    """'sarathi:128' (policy and token budget) or 'vllm'."""
    policy, _, budget = text.partition(":")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if budget and not budget.isdigit():
        raise ValueError(f"token budget must be a positive integer, got {budget!r}")
    label = f"{policy} (budget {budget})" if budget else policy
    return Target(label, policy=policy, token_budget=int(budget) if budget else default_budget)


def parse_peer(text: str) -> Target:
    """'NAME=URL'."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"a peer is NAME=http://host:port, got {text!r}")
    return Target(name, url=url.rstrip("/"))


@dataclass
class Plan:
    targets: list[Target]
    workload: WorkloadSpec
    qps: list[float]
    slo: TbtSlo | None = None
    ttft_slo: float | None = None
    capacity: bool = False
    delay_bound: float = 2.0
    start_qps: float = 0.5
    tolerance: float = 0.1
    max_probes: int = 8
    probe_seconds: float | None = None
    decode_batch: int = 32
    decode_context: int = 4096  # before scaling
    model: str = "smollm2-135m-instruct"
    server_args: list[str] = field(default_factory=list)
    command: str = ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    import torch

    return {"cpu": cpu, "commit": source_commit(), "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def source_commit() -> str | None:
    """The engine's git commit, with -dirty when its files differ from it; None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def server_args(plan: Plan, target: Target) -> list[str]:
    # Every probe of a target sends the same workload's prompts: with prefix caching on, the later
    # probes would find them cached and measure a capacity no new traffic sees.
    return ["--model", plan.model, "--policy", target.policy, "--token-budget", str(target.token_budget),
            "--max-model-len", str(plan.workload.max_model_len), "--no-prefix-caching", *plan.server_args]


@contextlib.asynccontextmanager
async def target_server(plan: Plan, target: Target, out: Path):
    """The target's URL: a peer's own, or our server started for the block's duration."""
    if target.url:
        yield target.url
        return
    server = ServerProcess(server_args(plan, target), log_path=out / "logs" / f"{target.policy}-{target.token_budget}.log")
    try:
        await asyncio.to_thread(server.start)
        yield server.url
    finally:
        server.stop(timeout=30)


async def execute(plan: Plan, out: Path, progress: BenchProgress) -> dict:
    """Run every target in turn; a target that fails is recorded with its error and the rest go on."""
    w = plan.workload
    results = {"meta": {"command": plan.command, "machine": machine(), "load_before": os.getloadavg(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "workload": asdict(w),
                        "slo": str(plan.slo) if plan.slo else None, "tbt_slo_s": None, "decode_time_s": None,
                        "delay_bound_s": plan.delay_bound, "title": f"{w.workload} x{w.scale:g}, seed {w.seed}"},
               "targets": []}
    for target in plan.targets:
        progress.prefix = f"{target.label}: "
        entry = {**asdict(target), "points": [], "capacity": None, "error": None}
        results["targets"].append(entry)
        try:
            await run_target(plan, target, entry, results["meta"], out, progress,
                             save=lambda: write_json(out / "results.json", results))
        except (OSError, RuntimeError, ValueError, TimeoutError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            progress.note(f"[red]{target.label} failed: {entry['error']}")
        write_json(out / "results.json", results)
    results["meta"]["load_after"] = os.getloadavg()
    write_outputs(results, out)
    return results


async def run_target(plan: Plan, target: Target, entry: dict, meta: dict, out: Path, progress: BenchProgress,
                     save: Callable[[], None]) -> None:
    w = plan.workload
    progress.note(f"{target.label}: {'starting server' if target.policy else 'connecting to ' + target.url}")
    async with target_server(plan, target, out) as url:
        endpoint = await connect(url, w)
        entry.update(model=endpoint.model, traits=asdict(endpoint.traits),
                     prefill_model=asdict(endpoint.prefill) if endpoint.prefill else None)
        if plan.slo and plan.slo.needs_decode_time and meta["decode_time_s"] is None:
            context = max(1, round(plan.decode_context * w.scale))
            meta["decode_time_s"] = await measure_decode_time(
                url, endpoint.model, plan.decode_batch, context, w.max_model_len,
                continuous_usage=endpoint.traits.continuous_usage, seed=w.seed)
            meta.update(decode_batch=plan.decode_batch, decode_context=context)
            progress.note(f"decode-only iteration at batch {plan.decode_batch}, context {context}: "
                          f"{meta['decode_time_s'] * 1000:.1f} ms")
        tbt_slo = plan.slo.resolve(meta["decode_time_s"]) if plan.slo else None
        meta["tbt_slo_s"] = tbt_slo
        for qps in plan.qps:
            point = await run_point(endpoint, w, qps, tbt_slo, plan.ttft_slo, hooks=progress.hooks)
            entry["points"].append(point.to_dict())
            progress.note(f"{target.label} @ {qps:g} req/s: {brief(point.summary)}")
            save()
        if plan.capacity:
            entry["capacity"] = await find_capacity(
                endpoint, w, tbt_slo, plan.delay_bound, plan.start_qps, plan.tolerance, plan.max_probes,
                plan.probe_seconds, hooks=progress.hooks,
                on_probe=lambda probe: progress.note(
                    f"{target.label} probe {probe['qps']:.3g} req/s {'passed' if probe['passed'] else 'failed'}: "
                    f"{brief(probe['summary'])}"))
            progress.note(f"{target.label}: capacity {entry['capacity']['capacity']:.3g} req/s")


def brief(summary: dict) -> str:
    def ms(key):
        return "–" if summary[key] is None else f"{summary[key] * 1000:.0f} ms"

    delay = summary["scheduling_delay_p50"]
    return (f"P99 TBT {ms('tbt_p99')}, median TTFT {ms('ttft_p50')}, median delay "
            f"{'–' if delay is None else f'{delay:.2f} s'}, {summary['num_failed']} failed")


def write_outputs(results: dict, out: Path) -> None:
    write_json(out / "results.json", results)
    (out / "table.md").write_text(points_table(results) + "\n" + capacity_table(results))
    plot(results, out / "figure.png")
