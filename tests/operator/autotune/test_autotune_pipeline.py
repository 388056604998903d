"""Fetch, apply and one pass of the pipeline against real `sarathi serve` processes (the small
random-weight Llama, quick to step), plus an engine that is down and one that hangs."""

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
from sarathi_operator.autotune import apply, fetch
from sarathi_operator.autotune.decide import Config, State
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


def admin_budget(url: str) -> int:
    request = urllib.request.Request(url + "/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["token_budget"]


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
    assert [results[k].snapshot.token_budget for k in engines] == [256, 256]
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
    assert all(r.snapshot.token_budget == 64 for r in results)
    assert stub.most == 2


def test_apply_sets_live_engines_reads_back_and_reports_the_rest(engines):
    urls = {**engines, "dead": dead_url()}

    async def set_budget(budget, token=TOKEN):
        async with aiohttp.ClientSession() as session:
            return await apply.apply_all(session, urls, token, budget)

    results = asyncio.run(set_budget(128))
    assert [results[k] for k in engines] == [None, None]
    assert "ClientConnectorError" in results["dead"]
    assert [admin_budget(u) for u in engines.values()] == [128, 128]
    refused = asyncio.run(set_budget(96, token="wrong"))
    assert all("401" in refused[k] for k in engines)
    asyncio.run(set_budget(256))


def test_a_pass_sums_both_engines_decides_and_applies(engines):
    urls = {**engines, "dead": dead_url()}
    config = Config(slo=1e-6, min_budget=32, max_budget=1024, min_samples=50)  # nothing meets it: shrink

    async def two_passes(between):
        tuner = Tuner(State(256), interval=1)
        async with aiohttp.ClientSession() as session:
            first = await tuner.step(session, urls, TOKEN, config, time.time())
            gaps = await asyncio.to_thread(between)
            second = await tuner.step(session, urls, TOKEN, config, time.time())
        return first, gaps, second

    first, gaps, second = asyncio.run(two_passes(lambda: serve_load(list(engines.values()))))
    assert first.decision.action == "hold" and "too few samples: 0" in first.decision.reason
    assert first.applied == [] and set(first.apply_errors) == {"dead"} and set(first.scrape_errors) == {"dead"}
    w = second.window
    assert w.engines == 2 and w.tbt_samples == gaps and w.request_rate > 0
    assert second.decision.action == "shrink" and second.decision.budget == 64  # at most a quarter
    assert sorted(second.applied) == sorted(engines) and set(second.apply_errors) == {"dead"}
    assert second.reported == {k: 64 for k in engines}
    assert [admin_budget(u) for u in engines.values()] == [64, 64]


def test_the_standalone_command_tunes_engines_by_url(engines):
    urls = list(engines.values())
    asyncio.run(apply_budget(urls, 512))
    command = [sys.executable, "-m", "sarathi_engine.cli", "autotune", "--slo-tbt-ms", "0.001",
               "--min-token-budget", "32", "--max-token-budget", "1024", "--interval", "2", "--passes", "2",
               "--min-samples", "1"] + [a for u in urls for a in ("--url", u)]
    proc = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first pass only takes the baseline scrape
    serve_load(urls, n=2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    passes = [json.loads(line) for line in [first, *out.splitlines()]]
    assert len(passes) == 2 and passes[0]["previous"] == 512
    assert passes[-1]["action"] == "shrink" and passes[-1]["budget"] < 512
    assert [admin_budget(u) for u in urls] == [passes[-1]["budget"]] * 2


async def apply_budget(urls, budget):
    async with aiohttp.ClientSession() as session:
        await apply.apply_all(session, {u: u for u in urls}, TOKEN, budget)
