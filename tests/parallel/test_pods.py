"""One engine across "pods": separate commands that learn their place only from environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) form one pipeline-parallel engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.launch import free_port

PROMPT = [5, 6, 7, 8, 9, 10]
POD0 = f"""
import json, sys
from sarathi_engine import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="32MiB", pipeline_parallel_size=2)
print(json.dumps(llm.generate({PROMPT}, SamplingParams(max_tokens=8))[0].token_ids))
llm.engine.shutdown()
"""
POD1 = """
import sys
from sarathi_engine.config import CacheConfig, EngineConfig, ParallelConfig
from sarathi_engine.worker import run_pod
config = EngineConfig(sys.argv[1], dtype="float32", cache=CacheConfig(kv_cache_memory=32 << 20),
                      parallel=ParallelConfig(1, 2))
sys.exit(run_pod(config, "127.0.0.1", int(sys.argv[2])))
"""


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_two_pods_form_one_pp2_engine_from_environment_variables(tiny_models):
    model = str(tiny_models["llama"])
    expected = LLM(model, dtype="float32", kv_cache_memory="32MiB").generate(PROMPT, SamplingParams(max_tokens=8))
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    health_port = free_port()
    pod1 = subprocess.Popen([sys.executable, "-c", POD1, model, str(health_port)], env={**env, "RANK": "1"})
    try:
        url = f"http://127.0.0.1:{health_port}"
        deadline = time.monotonic() + 120
        while get(url + "/health") != 200:
            assert pod1.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert get(url + "/ready") == 503  # pod 0 has not started: nothing to serve yet
        pod0 = subprocess.run([sys.executable, "-c", POD0, model], env={**env, "RANK": "0"}, capture_output=True,
                              text=True, timeout=300)
        assert pod0.returncode == 0, pod0.stderr[-3000:]
        assert json.loads(pod0.stdout.splitlines()[-1]) == expected[0].token_ids
        assert pod1.wait(60) == 0  # rank 0 stopped it
    finally:
        pod1.kill()
