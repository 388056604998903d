"""A rank that dies takes the engine down loudly: the rank-0 server exits non-zero within 30 s,
whether the rank was a child it started or another pod, mid-request or idle."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from sarathi_engine.launch import free_port
from sarathi_engine.server.launcher import ServerProcess

DEADLINE = 30.0


def rank_children(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children if b"sarathi_engine.worker" in open(f"/proc/{c}/cmdline", "rb").read()]


def stream_forever(server: ServerProcess, model: str, first_token: threading.Event) -> None:
    body = json.dumps({"model": model, "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    first_token.set()
    except OSError:
        pass  # the server went away: what the test wants


def exit_code_within(server: ServerProcess, seconds: float) -> int:
    try:
        return server.process.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {seconds:.0f} s after a rank died:\n{server.log_tail()}")


@pytest.fixture
def server_args(tiny_models) -> list[str]:
    return ["--model", str(tiny_models["llama"]), "--dtype", "float32", "--kv-cache-memory", "32MiB"]


def test_killing_a_child_rank_mid_request_ends_the_server_with_an_error(server_args):
    server = ServerProcess([*server_args, "--pipeline-parallel-size", "2"])
    with server:
        first_token = threading.Event()
        client = threading.Thread(target=stream_forever, args=(server, server_args[1], first_token), daemon=True)
        client.start()
        assert first_token.wait(120)
        [child] = rank_children(server.process.pid)
        os.kill(child, signal.SIGKILL)
        assert exit_code_within(server, DEADLINE) != 0
        assert "rank 1" in server.log_tail(200)


def test_killing_another_pod_while_idle_ends_the_serving_pod_with_an_error(server_args):
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    serving, worker = [ServerProcess([*server_args, "--tensor-parallel-size", "2"], env={**env, "RANK": str(r)})
                       for r in (0, 1)]
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(pod.start) for pod in (serving, worker)]:
                started.result()
        time.sleep(1)
        worker.process.kill()
        assert exit_code_within(serving, DEADLINE) != 0
        assert "rank 1" in serving.log_tail(200)
    finally:
        serving.stop(signal.SIGKILL)
        worker.stop(signal.SIGKILL)


def test_a_hung_step_fails_liveness_while_the_server_answers_and_recovers_with_it(server_args):
    # A rank that stops answering (SIGSTOP) hangs rank 0's step in its receive, as a stuck NCCL
    # collective or kernel would: nothing dies, so only the stall clock can tell.
    server = ServerProcess([*server_args, "--pipeline-parallel-size", "2", "--stall-timeout", "3"])
    with server:
        first_token = threading.Event()
        client = threading.Thread(target=stream_forever, args=(server, server_args[1], first_token), daemon=True)
        client.start()
        assert first_token.wait(120)
        assert health(server) == (200, "ok")
        [child] = rank_children(server.process.pid)
        os.kill(child, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while health(server)[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            code, status = health(server)
            assert (code, status) == (503, "engine stalled"), server.log_tail()
        finally:
            os.kill(child, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while health(server)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert health(server) == (200, "ok") and server.process.poll() is None


def health(server: ServerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
            return response.status, json.loads(response.read())["status"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["status"]
