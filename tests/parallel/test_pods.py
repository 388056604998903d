"""One engine across "pods": two `sarathi serve` commands that learn their place only from
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) form one pipeline-parallel
engine; pod 0 serves the API, pod 1 only its ranks and the probes."""
from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.launch import free_port
from sarathi_engine.server.launcher import ServerProcess

PROMPT = [5, 6, 7, 8, 9, 10]


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def test_two_pods_form_one_pp2_engine_and_serve_a_request(tiny_models):
    model = str(tiny_models["llama"])
    expected = LLM(model, dtype="float32", kv_cache_memory="32MiB").generate(PROMPT, SamplingParams(max_tokens=8))
    args = ["--model", model, "--dtype", "float32", "--kv-cache-memory", "32MiB", "--pipeline-parallel-size", "2"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    pods = [ServerProcess(args, env={**env, "RANK": str(rank)}) for rank in (0, 1)]
    try:
        with ThreadPoolExecutor(2) as pool:  # each becomes ready only once the other has joined
            for started in [pool.submit(pod.start) for pod in pods]:
                started.result()
        serving, worker = pods
        assert request(worker.url + "/health")[0] == 200 and request(worker.url + "/ready")[0] == 200
        assert request(worker.url + "/v1/models")[0] == 404  # only pod 0 serves the API
        status, body = request(serving.url + "/v1/completions",
                               {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert status == 200
        assert body["choices"][0]["text"] == expected[0].text
        assert body["usage"]["completion_tokens"] == 8
        assert serving.stop(signal.SIGTERM) == 0
        assert worker.process.wait(60) == 0  # rank 0 stopped it
    finally:
        for pod in pods:
            pod.stop(signal.SIGKILL)
