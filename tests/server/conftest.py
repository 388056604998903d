"""Real `sarathi serve` processes on 127.0.0.1 for the server tests."""
from __future__ import annotations

import pytest
from serving import ADMIN_TOKEN

from sarathi_engine.server.launcher import ServerProcess


@pytest.fixture(scope="module")
def smol_server(smollm2_dir):
    """SmolLM2 in float32 (so that greedy text is bit-for-bit repeatable), admin API enabled."""
    server = ServerProcess(
        ["--model", str(smollm2_dir), "--served-model-name", "smollm2", "--dtype", "float32",
         "--kv-cache-memory", "256MiB", "--max-model-len", "1024", "--token-budget", "256"],
        env={"SARATHI_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    with server:
        yield server


@pytest.fixture
def tiny_server(tiny_models):
    """Start servers on the small random-weight Llama (fast to load and step); stopped afterwards."""
    started = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(["--model", str(tiny_models["llama"]), "--dtype", "float32",
                                "--kv-cache-memory", "32MiB", *args], env=env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
