"""`sarathi autotune`: the outer loop against engines given by URL, without Kubernetes. The same
pass as in the operator (tuner.py); it sets the SLO and the margin on every engine that runs
others through the admin API (admin.push_settings, as the reconciler does), and prints each pass
as one JSON line.

    SARATHI_ADMIN_TOKEN=secret sarathi autotune --url http://127.0.0.1:8000 --slo-tbt-ms 500 --interval 10
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

import aiohttp

from ..admin import AdminError, push_settings
from .loop import LoopConfig, LoopState
from .tuner import Pass, Tuner


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sarathi autotune",
        description="Hold a P99 TBT SLO on engines given by URL, without Kubernetes: the engines plan every "
                    "iteration for it, this loop corrects their planning's margin; prints one JSON line per pass.")
    parser.add_argument("--url", action="append", required=True, dest="urls",
                        help="an engine's base URL (repeatable)")
    parser.add_argument("--slo-tbt-ms", type=float, required=True, help="target P99 time between tokens")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between passes")
    parser.add_argument("--min-samples", type=int, default=LoopConfig.min_samples,
                        help="token gaps a window needs before the loop acts on it")
    parser.add_argument("--passes", type=int, help="stop after this many passes (default: run until killed)")
    parser.add_argument("--token-env", default="SARATHI_ADMIN_TOKEN",
                        help="environment variable holding the engines' admin token")
    return parser.parse_args(argv)


def pass_record(p: Pass, applied: dict[str, str | None]) -> dict:
    w, d = p.window, p.decision
    return {
        "time": round(p.time, 3), "margin": d.margin, "previous": d.previous_margin, "action": d.action,
        "reason": d.reason, "infeasible": d.infeasible, "tbt_p99": w.tbt_p99, "ttft_p99": w.ttft_p99,
        "tbt_samples": w.tbt_samples, "iterations": int(w.iterations.count), "limited": w.limited,
        "request_rate": w.request_rate, "window_seconds": w.seconds,
        "applied": [k for k, e in applied.items() if e is None],
        "apply_errors": {k: e for k, e in applied.items() if e is not None}, "scrape_errors": p.scrape_errors,
    }


async def apply(session: aiohttp.ClientSession, engines: dict[str, str], token: str, p: Pass,
                wanted: dict) -> dict[str, str | None]:
    """Pushes the wanted settings to the engines that report others: {key: None or why not}."""
    stale = [k for k in engines if {n: p.reported.get(k, {}).get(n) for n in wanted} != wanted]

    async def one(key: str) -> str | None:
        try:
            await push_settings(session, engines[key], token, wanted)
        except AdminError as e:
            return str(e)
        return None

    return dict(zip(stale, await asyncio.gather(*(one(k) for k in stale))))


async def run(engines: dict[str, str], token: str, config: LoopConfig, interval: float,
              on_pass: Callable[[Pass, dict], None], passes: int | None = None,
              stop: asyncio.Event | None = None) -> None:
    """Passes every interval until `passes` are done or stop is set."""
    stop = stop or asyncio.Event()
    async with aiohttp.ClientSession() as session:
        tuner = Tuner(LoopState(), interval)
        done, next_at = 0, time.monotonic()
        while not stop.is_set() and (passes is None or done < passes):
            p = await tuner.step(session, engines, config, time.time())
            wanted = {"tbt_slo_ms": config.slo * 1000, "slo_margin": p.decision.margin}
            on_pass(p, await apply(session, engines, token, p, wanted))
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
    config = LoopConfig(slo=args.slo_tbt_ms / 1000, min_samples=args.min_samples)
    engines = {url: url for url in args.urls}

    def show(p: Pass, applied: dict) -> None:
        print(json.dumps(pass_record(p, applied)), flush=True)

    try:
        asyncio.run(run(engines, token, config, args.interval, show, args.passes))
    except KeyboardInterrupt:
        pass
    return 0
