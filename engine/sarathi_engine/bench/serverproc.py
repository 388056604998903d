"""Our own server as a child process for one benchmark target: a free port, `sarathi serve` with
the target's policy and budget, wait for /ready, stop with SIGTERM (then SIGKILL)."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str, port: int, policy: str, token_budget: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sarathi_engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--policy", policy, "--token-budget", str(token_budget), *extra]


async def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode} before it was ready")
            try:
                async with session.get(url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready within {timeout_s:g} s")


class ServerProcess:
    """`async with ServerProcess(...) as url:` runs a server for the block's duration."""

    def __init__(self, model: str, policy: str, token_budget: int, extra: list[str], log: Path,
                 ready_timeout_s: float = 300, stop_timeout_s: float = 30) -> None:
        self.port = free_port()
        self.command = serve_command(model, self.port, policy, token_budget, extra)
        self.log, self.ready_timeout_s, self.stop_timeout_s = log, ready_timeout_s, stop_timeout_s
        self.process: subprocess.Popen | None = None

    async def __aenter__(self) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        try:
            await wait_ready(url, self.process, self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return url

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
