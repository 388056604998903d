"""A soak: our server under sustained overload, with clients that leave mid-stream and a token
budget that changes every minute, watched for errors, memory growth and leaked KV blocks.

1. capacity: closed-loop saturation (every client sends its next request when the last ends)
   for --capacity-seconds; completed requests per second after the first quarter is the
   server's capacity for this workload.
2. soak: Poisson arrivals at --overload x capacity for --minutes. A --leave share of clients
   closes its connection after a random number of tokens. Every --budget-every seconds the
   admin API sets the next token budget of --budgets. Every 10 s: the server's resident memory
   and its queue and KV gauges.
3. drain: no new requests; once nothing runs or waits, the KV cache's usage.

Expectations: no 5xx other than the documented overload answers (429 for a full waiting queue,
503 while loading or draining), resident memory growing less than 5% after the first 5
minutes, every KV block free at the end.

    python -m benchmarks.soak --minutes 30 --out bench-results/soak --doc docs/benchmarks.md
"""
import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from sarathi_engine.bench import loadgen
from sarathi_engine.bench.arrivals import arrival_times
from sarathi_engine.bench.compare import machine
from sarathi_engine.bench.docs import write_section
from sarathi_engine.bench.speed import cpu_list
from sarathi_engine.bench.speed_protocol import descendants
from sarathi_engine.bench.workloads import WORKLOADS, prompt_token_ids, sample_lengths, scale_and_clip
from sarathi_engine.server.launcher import ServerProcess

DOC_SECTION = "soak"
OVERLOAD_STATUSES = (429, 503)
SAMPLE_SECONDS = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workload", default="sharegpt4", choices=list(WORKLOADS))
    p.add_argument("--scale", type=float, default=0.125, help="multiplies the workload's lengths")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 128, 512], help="cycled every --budget-every s")
    p.add_argument("--budget-every", type=float, default=60.0)
    p.add_argument("--max-waiting", type=int, default=16, help="the server's queue: beyond it, 429")
    p.add_argument("--capacity-clients", type=int, default=16)
    p.add_argument("--capacity-seconds", type=float, default=240.0)
    p.add_argument("--overload", type=float, default=1.5, help="arrival rate over the measured capacity")
    p.add_argument("--leave", type=float, default=0.1, help="share of clients that disconnect mid-stream")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--steady-after", type=float, default=5.0,
                   help="minutes after which memory must stop growing: the first ones fill caches and pools")
    p.add_argument("--threads", default="0-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/soak"))
    p.add_argument("--doc", type=Path, help="rewrite the generated section of this markdown file")
    return p.parse_args(argv)


class Requests:
    """Prompts and output lengths drawn from the workload, one after the other, without end."""

    def __init__(self, args) -> None:
        self.args, self.batch, self.drawn = args, 0, collections.deque()

    def next(self) -> tuple[list[int], int]:
        if not self.drawn:
            seed = self.args.seed * 1000 + self.batch
            specs = scale_and_clip(sample_lengths(WORKLOADS[self.args.workload], 256, seed),
                                   self.args.scale, self.args.max_model_len)
            self.drawn.extend(zip(prompt_token_ids(specs, seed), [s.output_len for s in specs]))
            self.batch += 1
        return self.drawn.popleft()


async def send(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int,
               leave_after: int | None) -> dict:
    """One streamed completion; leave_after: close the connection after that many tokens."""
    outcome = {"status": None, "tokens": 0, "left": False, "error": None}
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        async with session.post(url + loadgen.COMPLETIONS, json=payload) as response:
            outcome["status"] = response.status
            if response.status != 200:
                outcome["error"] = (await response.text())[:200]
                return outcome
            async for line in response.content:
                if line.startswith(b"data: {"):
                    outcome["tokens"] += 1
                    if leave_after is not None and outcome["tokens"] >= leave_after:
                        outcome["left"] = True
                        response.close()
                        return outcome
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
    return outcome


async def capacity(args, url: str, model: str, requests: Requests) -> dict:
    """Requests per second the server completes while saturated."""
    done: list[float] = []
    start = time.monotonic()
    deadline = start + args.capacity_seconds

    async def client(session):
        while time.monotonic() < deadline:
            prompt, max_tokens = requests.next()
            outcome = await send(session, url, model, prompt, max_tokens, None)
            if outcome["status"] != 200 or outcome["error"]:
                raise RuntimeError(f"capacity probe request failed: {outcome}")
            done.append(time.monotonic() - start)
            if len(done) % 10 == 0:
                print(f"capacity: {len(done)} completed in {done[-1]:.0f} s", flush=True)

    async with loadgen.client_session(3600) as session:
        await asyncio.gather(*(client(session) for _ in range(args.capacity_clients)))
    warm = args.capacity_seconds / 4
    counted = [t for t in done if warm <= t <= args.capacity_seconds]
    return {"requests_per_s": len(counted) / (args.capacity_seconds - warm), "completed": len(done)}


def resident_bytes(pid: int) -> int:
    """Resident memory of a process and its children."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


GAUGES = ("sarathi_num_requests_running", "sarathi_num_requests_waiting", "sarathi_kv_cache_usage_ratio",
          "sarathi_token_budget")


async def gauges(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return {f.name: sum(s.value for s in f.samples) for f in text_string_to_metric_families(text) if f.name in GAUGES}


async def soak(args, server: ServerProcess, model: str, admin_token: str, rate: float, requests: Requests) -> dict:
    url, seconds = server.url, args.minutes * 60
    rng = random.Random(args.seed)
    sends = arrival_times(int(rate * seconds * 1.5) + 10, rate, args.seed)
    sends = [float(t) for t in sends if t < seconds]
    outcomes, samples, budget_changes, tasks = [], [], [], []
    start = time.monotonic()

    async def one(at: float):
        prompt, max_tokens = requests.next()
        leave = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < args.leave else None
        outcome = await send(session, url, model, prompt, max_tokens, leave)
        outcomes.append({**outcome, "t": at, "max_tokens": max_tokens, "leave_after": leave})

    async def watch():
        headers = {"Authorization": f"Bearer {admin_token}"}
        next_change, turn = args.budget_every, 1
        while (now := time.monotonic() - start) < seconds:
            samples.append({"t": now, "rss": resident_bytes(server.process.pid), **await gauges(session, url)})
            if now >= next_change:
                budget = args.budgets[turn % len(args.budgets)]
                async with session.patch(url + "/admin/config", json={"token_budget": budget}, headers=headers) as r:
                    budget_changes.append({"t": now, "token_budget": budget, "status": r.status})
                next_change, turn = next_change + args.budget_every, turn + 1
            if len(samples) % 6 == 0:
                statuses = collections.Counter(str(o["status"]) for o in outcomes)
                print(f"soak {now / 60:.1f}/{args.minutes:g} min: sent {len(tasks)}, answered {dict(statuses)}, "
                      f"left {sum(o['left'] for o in outcomes)}, resident {samples[-1]['rss'] / 2**20:.0f} MiB, "
                      f"waiting {samples[-1]['sarathi_num_requests_waiting']:.0f}", flush=True)
            await asyncio.sleep(SAMPLE_SECONDS)

    async with loadgen.client_session(900) as session:
        watcher = asyncio.create_task(watch())
        for at in sends:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(at)))
        await watcher
        print(f"drain: waiting for {sum(not t.done() for t in tasks)} requests in flight", flush=True)
        await asyncio.gather(*tasks)
        for _ in range(600):
            end = await gauges(session, url)
            if end["sarathi_num_requests_running"] == end["sarathi_num_requests_waiting"] == 0:
                break
            await asyncio.sleep(0.5)
        end = {**end, "rss": resident_bytes(server.process.pid)}
    return {"rate": rate, "outcomes": outcomes, "samples": samples, "budget_changes": budget_changes, "end": end}


def verdict(result: dict) -> dict:
    """The soak's figures against its three expectations."""
    outcomes, samples = result["soak"]["outcomes"], result["soak"]["samples"]
    statuses = collections.Counter(str(o["status"]) for o in outcomes)
    server_errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500
                        and int(s) not in OVERLOAD_STATUSES)
    steady = [s["rss"] for s in samples if s["t"] >= result["args"]["steady_after"] * 60]
    growth = (max(steady) / steady[0] - 1) if steady else None
    end = result["soak"]["end"]
    return {
        "requests": len(outcomes),
        "statuses": dict(statuses),
        "left_mid_stream": sum(o["left"] for o in outcomes),
        "client_errors": sum(1 for o in outcomes if o["status"] is None),
        "unexpected_5xx": server_errors,
        "rss_steady_mib": steady[0] / 2**20 if steady else None,
        "rss_max_mib": max(steady) / 2**20 if steady else None,
        "rss_growth": growth,
        "kv_usage_at_end": end["sarathi_kv_cache_usage_ratio"],
        "budget_changes": len(result["soak"]["budget_changes"]),
        "budget_changes_refused": sum(c["status"] != 200 for c in result["soak"]["budget_changes"]),
        "ok": server_errors == 0 and growth is not None and growth < 0.05
        and end["sarathi_kv_cache_usage_ratio"] == 0 and end["sarathi_num_requests_running"] == 0,
    }


def report(result: dict) -> str:
    v, a, meta = result["verdict"], result["args"], result["meta"]
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(v["statuses"].items()))
    growth = f"{v['rss_growth'] * 100:.2f}%" if v["rss_growth"] is not None else "n/a"
    return "\n".join([
        f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), commit "
        f"{meta['machine']['commit']}, load {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after.",
        "",
        f"{a['workload']} x{a['scale']}, {a['dtype']}, `--max-waiting {a['max_waiting']}`. Capacity (closed loop, "
        f"{a['capacity_clients']} clients, {a['capacity_seconds']:.0f} s): "
        f"{result['capacity']['requests_per_s']:.3f} req/s; soak: Poisson {result['soak']['rate']:.3f} req/s "
        f"({a['overload']}x) for {a['minutes']:g} min, {a['leave']:.0%} of clients leaving mid-stream, token budget "
        f"cycling {'/'.join(map(str, a['budgets']))} every {a['budget_every']:.0f} s.",
        "",
        "| figure | value | expected |",
        "|---|---|---|",
        f"| requests sent | {v['requests']} | |",
        f"| HTTP statuses | {statuses} | 200, 429, 503 only |",
        f"| unexpected 5xx | {v['unexpected_5xx']} | 0 |",
        f"| clients that left mid-stream | {v['left_mid_stream']} | ~{a['leave']:.0%} of those served |",
        f"| requests without an HTTP answer | {v['client_errors']} | 0 |",
        f"| budget changes (refused) | {v['budget_changes']} ({v['budget_changes_refused']}) | every one applied |",
        f"| resident memory at {a['steady_after']:g} min, max after | {_mib(v['rss_steady_mib'])}, "
        f"{_mib(v['rss_max_mib'])} | |",
        f"| growth after {a['steady_after']:g} min | {growth} | < 5% |",
        f"| KV cache usage once drained | {v['kv_usage_at_end']:g} | 0 |",
        "",
        f"**{'Every expectation held.' if v['ok'] else 'An expectation failed.'}**",
    ])


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def plot(result: dict, path: Path) -> None:
    """Resident memory, queue and budget over time; each minute's answers by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, outcomes = result["soak"]["samples"], result["soak"]["outcomes"]
    t = np.array([s["t"] for s in samples]) / 60
    fig, (mem, queue, answers) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    mem.plot(t, [s["rss"] / 2**20 for s in samples])
    mem.axvline(result["args"]["steady_after"], color="grey", linestyle=":")
    mem.set(ylabel="resident MiB", title="server resident memory (growth measured after the dotted line)")
    queue.plot(t, [s["sarathi_num_requests_waiting"] for s in samples], label="waiting")
    queue.plot(t, [s["sarathi_num_requests_running"] for s in samples], label="running")
    queue.plot(t, [s["sarathi_kv_cache_usage_ratio"] * 100 for s in samples], label="KV cache used, %")
    budget = queue.twinx()
    budget.step(t, [s["sarathi_token_budget"] for s in samples], where="post", color="grey", alpha=0.5)
    budget.set_ylabel("token budget")
    queue.legend(loc="upper left")
    minutes = int(max((o["t"] for o in outcomes), default=0) // 60) + 1
    kinds = sorted({str(o["status"]) for o in outcomes})
    bottom = np.zeros(minutes)
    for kind in kinds:
        counts = np.bincount([int(o["t"] // 60) for o in outcomes if str(o["status"]) == kind], minlength=minutes)
        answers.bar(np.arange(minutes) + 0.5, counts, 0.9, bottom=bottom, label=f"HTTP {kind}")
        bottom += counts
    answers.set(xlabel="minutes", ylabel="requests sent", title="answers by the minute they were sent")
    answers.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(args) -> dict:
    admin_token = secrets.token_urlsafe(16)
    server = ServerProcess(
        ["--model", args.model, "--served-model-name", args.model, "--dtype", args.dtype,
         "--max-model-len", str(args.max_model_len), "--token-budget", str(args.budgets[0]),
         "--max-token-budget", str(max(args.budgets)), "--max-waiting", str(args.max_waiting)],
        env={"OMP_NUM_THREADS": str(len(cpu_list(args.threads))), "SARATHI_ADMIN_TOKEN": admin_token},
        log_path=args.out / "server.log")
    await asyncio.to_thread(server.start, 600)
    try:
        model = await loadgen.served_model(server.url)
        requests = Requests(args)
        measured = await capacity(args, server.url, model, requests)
        print(f"capacity: {measured['requests_per_s']:.3f} req/s", flush=True)
        soaked = await soak(args, server, model, admin_token, args.overload * measured["requests_per_s"], requests)
    finally:
        code = await asyncio.to_thread(server.stop)
    return {"capacity": measured, "soak": soaked, "server_exit_code": code}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(), "load_before": os.getloadavg()}
    result = asyncio.run(run(args))
    result |= {"meta": {**meta, "load_after": os.getloadavg()},
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    result["verdict"] = verdict(result)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    plot(result, args.out / "figure.png")
    if args.doc:
        figure = args.doc.parent / "soak.png"
        figure.write_bytes((args.out / "figure.png").read_bytes())
        write_section(args.doc, DOC_SECTION, report(result) + f"\n\n![soak]({figure.name})")
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
