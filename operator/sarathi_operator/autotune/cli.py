"""`sarathi autotune`: the autotuner against engines given by URL, without Kubernetes. The same
pipeline as in the operator (tuner.py); each pass is printed as one JSON line.

    SARATHI_ADMIN_TOKEN=secret sarathi autotune --url http://127.0.0.1:8000 --slo-tbt-ms 500 \\
        --min-token-budget 32 --max-token-budget 1024 --interval 10
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

import aiohttp

from . import fetch
from .decide import Config, State
from .tuner import Pass, Tuner


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sarathi autotune",
        description="Tune the token budget of engines given by URL to hold a P99 TBT SLO, without Kubernetes; "
                    "prints one JSON line per pass.")
    parser.add_argument("--url", action="append", required=True, dest="urls",
                        help="an engine's base URL (repeatable)")
    parser.add_argument("--slo-tbt-ms", type=float, required=True, help="target P99 time between tokens")
    parser.add_argument("--min-token-budget", type=int, default=32)
    parser.add_argument("--max-token-budget", type=int, default=8192)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between passes")
    parser.add_argument("--min-samples", type=int, default=Config.min_samples,
                        help="token gaps a window needs before a decision")
    parser.add_argument("--passes", type=int, help="stop after this many passes (default: run until killed)")
    parser.add_argument("--token-env", default="SARATHI_ADMIN_TOKEN",
                        help="environment variable holding the engines' admin token")
    return parser.parse_args(argv)


def pass_record(p: Pass) -> dict:
    w = p.window
    return {
        "time": round(p.time, 3), "budget": p.decision.budget, "previous": p.previous_budget,
        "action": p.decision.action, "reason": p.decision.reason, "tbt_p99": w.tbt_p99, "ttft_p99": w.ttft_p99,
        "tbt_samples": w.tbt_samples, "iteration_p99": w.iteration_p99,
        "acted_on": p.evidence.of if p.evidence else None, "request_rate": w.request_rate,
        "window_seconds": w.seconds, "budget_bound_share": w.budget_bound_share, "applied": p.applied, "apply_errors": p.apply_errors,
        "scrape_errors": p.scrape_errors,
    }


async def current_budget(session: aiohttp.ClientSession, engines: dict[str, str]) -> int:
    """The budget the engines report (the lowest, when they disagree)."""
    budgets = [s.snapshot.token_budget for s in await fetch.scrape_all(session, engines)
               if s.snapshot and s.snapshot.token_budget]
    if not budgets:
        raise RuntimeError(f"no engine answered /metrics with its token budget: {', '.join(engines.values())}")
    return min(budgets)


async def run(engines: dict[str, str], token: str, config: Config, interval: float,
              on_pass: Callable[[Pass], None], passes: int | None = None, stop: asyncio.Event | None = None) -> None:
    """Passes every interval until `passes` are done or stop is set; starts from the budget
    the engines run."""
    stop = stop or asyncio.Event()
    async with aiohttp.ClientSession() as session:
        tuner = Tuner(State(await current_budget(session, engines)), interval)
        done, next_at = 0, time.monotonic()
        while not stop.is_set() and (passes is None or done < passes):
            on_pass(await tuner.step(session, engines, token, config, time.time()))
            done += 1
            next_at += interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            except asyncio.TimeoutError:
                pass


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        print(f"sarathi autotune: error: ${args.token_env} is not set", file=sys.stderr)
        return 2
    config = Config(slo=args.slo_tbt_ms / 1000, min_budget=args.min_token_budget,
                    max_budget=args.max_token_budget, min_samples=args.min_samples)
    engines = {url: url for url in args.urls}

    def show(p: Pass) -> None:
        print(json.dumps(pass_record(p)), flush=True)

    try:
        asyncio.run(run(engines, token, config, args.interval, show, args.passes))
    except RuntimeError as e:
        print(f"sarathi autotune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
