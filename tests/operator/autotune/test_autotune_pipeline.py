"""Fetch, the admin push and passes of the outer loop against real `sarathi serve` processes
(the small random-weight Llama, quick to step), plus an engine that is down and one that hangs."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from sarathi_engine.bench import loadgen
from sarathi_engine.launch import free_port
from sarathi_engine.server.launcher import ServerProcess
from sarathi_operator.admin import AdminError, push_settings
from sarathi_operator.autotune import fetch
from sarathi_operator.autotune.loop import LoopConfig, LoopState
from sarathi_operator.autotune.tuner import Tuner

TOKEN = "autotune-test-token"
ENV = {"SARATHI_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engines(tiny_models):
    servers = [ServerProcess(["--model", str(tiny_models["llama"]), "--dtype", "float32", "--kv-cache-memory",
                              "32MiB", "--token-budget", "256", "--served-model-name", "tiny"], env=ENV) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield {f"engine-{i}": s.url for i, s in enumerate(servers)}
    finally:
        for server in servers:
            server.stop()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def admin_config(url: str) -> dict:
    request = urllib.request.Request(url + "/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


NEUTRAL = {"token_budget": 256, "tbt_slo_ms": None, "slo_margin": 1.0}


async def push_all(urls, wanted: dict, token: str = TOKEN) -> dict:
    """{url: None or why not}."""
    async def one(session, url):
        try:
            await push_settings(session, url, token, wanted)
        except AdminError as e:
            return str(e)
        return None

    async with aiohttp.ClientSession() as session:
        return dict(zip(urls, await asyncio.gather(*(one(session, u) for u in urls))))


def serve_load(urls, n: int = 6, prompt_len: int = 40, max_tokens: int = 24) -> int:
    """Streams n requests to each engine at once; returns the token gaps the clients saw."""
    load = loadgen.Load([[1000 + i for i in range(prompt_len)]] * n, [max_tokens] * n, [0.0] * n)

    async def all_engines():
        return await asyncio.gather(*(loadgen.run_load(u, "tiny", load, continuous_usage=False) for u in urls))

    runs = asyncio.run(all_engines())
    records = [r for records, _ in runs for r in records]
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    return sum(len(r.token_times) - 1 for r in records)


class Stub:
    """/metrics that answers after a delay, counting how many requests it holds at once."""

    def __init__(self, delay: float):
        self.delay, self.open, self.most = delay, 0, 0

    def app(self) -> web.Application:
        async def metrics(request):
            self.open += 1
            self.most = max(self.most, self.open)
            await asyncio.sleep(self.delay)
            self.open -= 1
            return web.Response(text="sarathi_token_budget 64\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app


async def with_stubs(stub: Stub, count: int, body):
    runners, urls = [], {}
    for i in range(count):
        runner = web.AppRunner(stub.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[f"stub-{i}"] = f"http://127.0.0.1:{port}"
    try:
        return await body(urls)
    finally:
        for runner in runners:
            await runner.cleanup()


def test_scrapes_read_real_engines_and_report_a_dead_one(engines):
    urls = {**engines, "dead": dead_url()}

    async def scrape():
        async with aiohttp.ClientSession() as session:
            return await fetch.scrape_all(session, urls)

    results = {s.key: s for s in asyncio.run(scrape())}
    assert [results[k].snapshot.settings for k in engines] == [NEUTRAL, NEUTRAL]
    assert results["dead"].snapshot is None and "ClientConnectorError" in results["dead"].error


def test_a_hanging_engine_costs_its_own_timeout_only():
    async def body(urls):
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            results = await fetch.scrape_all(session, urls, timeout=aiohttp.ClientTimeout(total=0.5))
            return results, time.monotonic() - started

    results, took = asyncio.run(with_stubs(Stub(delay=5), 3, body))
    assert all("TimeoutError" in r.error for r in results)
    assert took < 2


def test_scrapes_run_at_most_concurrency_at_a_time():
    stub = Stub(delay=0.2)

    async def body(urls):
        async with aiohttp.ClientSession() as session:
            return await fetch.scrape_all(session, urls, concurrency=2)

    results = asyncio.run(with_stubs(stub, 6, body))
    assert all(r.snapshot.settings == {"token_budget": 64} for r in results)
    assert stub.most == 2


def test_a_push_sets_live_engines_reads_back_and_reports_the_rest(engines):
    urls = [*engines.values(), dead_url()]
    results = asyncio.run(push_all(urls, {"token_budget": 128, "slo_margin": 0.8}))
    assert [results[u] for u in engines.values()] == [None, None] and "ClientConnectorError" in results[urls[-1]]
    assert all((c["token_budget"], c["slo_margin"]) == (128, 0.8) for c in map(admin_config, engines.values()))
    refused = asyncio.run(push_all(list(engines.values()), {"token_budget": 96}, token="wrong"))
    assert all("401" in why for why in refused.values())
    asyncio.run(push_all(list(engines.values()), NEUTRAL))


def test_a_pass_sums_both_engines_and_steps_the_loop(engines):
    urls = {**engines, "dead": dead_url()}
    config = LoopConfig(slo=1e-6, min_samples=50)  # nothing meets it: tighten

    async def two_passes(between):
        tuner = Tuner(LoopState(), interval=1)
        async with aiohttp.ClientSession() as session:
            first = await tuner.step(session, urls, config, time.time())
            gaps = await asyncio.to_thread(between)
            second = await tuner.step(session, urls, config, time.time())
        return first, gaps, second

    first, gaps, second = asyncio.run(two_passes(lambda: serve_load(list(engines.values()))))
    assert first.decision.action == "hold" and "too few samples: 0" in first.decision.reason
    assert not first.decision.acted and set(first.scrape_errors) == {"dead"}
    w = second.window
    assert w.engines == 2 and w.tbt_samples == gaps and w.request_rate > 0
    assert second.decision.action == "tighten" and second.decision.margin == config.min_margin
    assert second.reported == {k: NEUTRAL for k in engines}


def test_a_new_slo_starts_a_new_window(engines):
    """Gaps served under another SLO say nothing about planning for this one."""
    urls = dict(engines)

    async def passes():
        tuner = Tuner(LoopState(), interval=1)
        async with aiohttp.ClientSession() as session:
            await tuner.step(session, urls, LoopConfig(slo=0.5, min_samples=50), time.time())
            await asyncio.to_thread(serve_load, list(engines.values()))
            return await tuner.step(session, urls, LoopConfig(slo=0.2, min_samples=50), time.time())

    after = asyncio.run(passes())
    assert after.window.tbt_samples == 0 and not after.decision.acted


def test_the_standalone_command_sets_the_slo_by_url_and_reports_it_infeasible(engines):
    urls = list(engines.values())
    command = [sys.executable, "-m", "sarathi_engine.cli", "autotune", "--slo-tbt-ms", "0.001", "--interval", "2",
               "--passes", "2", "--min-samples", "1"] + [a for u in urls for a in ("--url", u)]
    proc = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())  # the baseline scrape; the SLO is set at once
    assert sorted(first["applied"]) == sorted(urls) and first["action"] == "hold"
    serve_load(urls, n=2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    (last,) = [json.loads(line) for line in out.splitlines()]
    # A microsecond: the decodes alone exceed it, so the margin holds and the load is reported infeasible.
    assert last["infeasible"] and last["action"] == "hold" and "more replicas" in last["reason"]
    configs = [admin_config(u) for u in urls]
    assert all((c["tbt_slo_ms"], c["slo_margin"]) == (0.001, LoopState().margin) for c in configs)
    assert all(c["slo_planning"]["infeasible_iterations"] > 0 for c in configs)
    asyncio.run(push_all(urls, NEUTRAL))
