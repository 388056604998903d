"""Bad input, fuzzing, disconnects, overload and shutdown: the server answers with a clear 4xx or
503, frees what it held, and keeps serving everyone else."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import openai
from serving import count, get, post, scrape

BAD_BODIES = [
    ("not json", 400, "not valid JSON"),
    ([1, 2, 3], 400, "must be a JSON object"),
    ({}, 400, "'prompt' is required"),
    ({"prompt": 42}, 400, "'prompt' must be"),
    ({"prompt": "hi", "max_tokens": "10"}, 400, "'max_tokens' must be an integer"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "'max_tokens' must be an integer >= 1"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "maximum context length is 1024 tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"prompt": "hi", "top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
    ({"prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ({"prompt": "hi", "n": 300}, 400, "'n' must be an integer in [1, 16]"),
    ({"prompt": "hi", "frobnicate": True}, 400, "unrecognized request argument: frobnicate"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": [5] * 2000}, 400, "prompt has 2000 tokens; max_model_len is 1024"),
    ({"prompt": [1, 2, -7]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist."),
]


def raw_post(url: str, data: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_4xx_errors_while_a_stream_goes_on(smol_server):
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0)
    prompt = "Write a poem about the sea."
    reference = client.completions.create(model="smollm2", prompt=prompt, max_tokens=60, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    streamed = []

    def stream():
        for chunk in client.completions.create(model="smollm2", prompt=prompt, max_tokens=60, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            streamed.append(chunk.choices[0].text)

    reader = threading.Thread(target=stream)
    reader.start()
    for body, status, message in BAD_BODIES:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        code, error = raw_post(smol_server.url + "/v1/completions", data)
        assert (code, message in error["error"]["message"]) == (status, True), (body, error)
        assert error["error"]["type"]
    code, error = post(smol_server.url + "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400 and "'messages' must be" in error["error"]["message"]
    code, error = raw_post(smol_server.url + "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert code == 413 and "too large" in error["error"]["message"]
    code, error = get(smol_server.url + "/v1/nothing-here")
    assert code == 404 and error["error"]["type"] == "not_found_error"
    reader.join(120)
    assert "".join(streamed) == reference and len(streamed) == 60


def test_schemathesis_finds_no_server_error(tiny_server, tmp_path):
    # A short context bounds every generated completion, so fuzzing stays quick on a CPU.
    server = tiny_server("--max-model-len", "128")
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "50", "--seed", "1", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert get(server.url + "/ready")[0] == 200


SHARED_OPENING = "You are a storyteller. Tell each story in plain words, one short paragraph at a time. " * 4


async def _disconnect_mid_stream(url: str, clients: int) -> int:
    async def one(session, i):
        # Far more tokens than the three read, so that no request can finish before its client has gone.
        # A shared opening, so that the clients share cached blocks as well as hold their own.
        body = {"prompt": SHARED_OPENING + f"Story number {i}:", "max_tokens": 900, "stream": True, "ignore_eos": True}
        async with session.post(url + "/v1/completions", json=body) as response:
            assert response.status == 200
            received = 0
            async for line in response.content:
                received += line.startswith(b"data: ")
                if received == 3:
                    return received  # leaving the block closes the connection mid-stream

    async with aiohttp.ClientSession() as session:
        return sum(await asyncio.gather(*(one(session, i) for i in range(clients))))


def wait_until_idle(url: str, timeout: float = 60) -> dict:
    """/metrics once no request is running or waiting (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        idle = count(samples, "sarathi_num_requests_running") == count(samples, "sarathi_num_requests_waiting") == 0
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_fifty_clients_leaving_mid_stream_free_every_block(smol_server):
    before = scrape(smol_server.url)
    assert asyncio.run(_disconnect_mid_stream(smol_server.url, 50)) == 150
    after = wait_until_idle(smol_server.url)
    assert count(after, "sarathi_kv_cache_usage_ratio") == 0
    hits = count(after, "sarathi_prefix_cache_hits_total") - count(before, "sarathi_prefix_cache_hits_total")
    assert hits >= 16 * 40  # most found the opening's blocks that an earlier one computed
    aborted = count(after, "sarathi_requests_total", finish_reason="abort")
    assert aborted - count(before, "sarathi_requests_total", finish_reason="abort") == 50
    assert post(smol_server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 3})[0] == 200


def test_a_full_waiting_queue_answers_429_and_the_server_stays_up(tiny_server):
    server = tiny_server("--max-num-seqs", "1", "--max-waiting", "2")

    async def flood():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            async def one(i):
                # Long enough that the first is still running when the last of the twelve arrives.
                body = {"prompt": f"request {i}", "max_tokens": 1500, "ignore_eos": True}
                async with session.post(server.url + "/v1/completions", json=body) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(flood())
    # One running and two waiting are served in full; the others are turned away at once. Until
    # the engine has scheduled the first, it holds a waiting place too: then only two are served.
    statuses = sorted(status for status, _ in results)
    served = statuses.count(200)
    assert served in (2, 3) and statuses == [200] * served + [429] * (12 - served), statuses
    message = next(body for status, body in results if status == 429)["error"]
    assert "overloaded" in message["message"] and message["type"] == "rate_limit_error"
    assert get(server.url + "/ready")[0] == 200
    wait_until_idle(server.url)
    assert post(server.url + "/v1/completions", {"prompt": "after", "max_tokens": 2})[0] == 200


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_server):
    server = tiny_server("--max-num-seqs", "8", "--grace-period", "60")

    # Long enough that every request is still streaming when the probes below arrive: with 400
    # tokens, the tiny model on a fast machine finished all eight within the second this test
    # used to wait, and the server had drained and exited before the probes.
    max_tokens = 1600

    async def load_then_terminate():
        async with aiohttp.ClientSession() as session:
            streaming = [asyncio.Event() for _ in range(8)]

            async def one(i):
                body = {"prompt": f"request {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
                tokens, last = 0, b""
                async with session.post(server.url + "/v1/completions", json=body) as response:
                    async for line in response.content:
                        tokens += line.startswith(b"data: {")
                        last = line.strip() or last
                        if tokens:
                            streaming[i].set()
                    return tokens, last
            tasks = [asyncio.ensure_future(one(i)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in streaming)), 60)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.get(server.url + "/ready") as ready:
                ready_status = ready.status
            async with session.post(server.url + "/v1/completions", json={"prompt": "late"}) as late:
                late_status = late.status
            return await asyncio.gather(*tasks), ready_status, late_status

    results, ready_status, late_status = asyncio.run(load_then_terminate())
    assert [tokens for tokens, _ in results] == [max_tokens] * 8
    assert all(last == b"data: [DONE]" for _, last in results)
    assert (ready_status, late_status) == (503, 503)
    assert server.process.wait(30) == 0
