"""Every rank but 0: `python -m sarathi_engine.worker` for the ranks a pod starts as child
processes, and run_pod() for the main process of a pod other than pod 0 (`sarathi serve` with
RANK != 0). Such a pod serves no API, but answers GET /health and GET /ready on the serve port so
that Kubernetes probes work on it; /ready turns true once its ranks have joined and loaded.

A worker exits 0 when rank 0 stops the engine and non-zero when it loses a peer, so a dead rank
brings the whole engine down instead of leaving it hanging.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

from aiohttp import web

from sarathi_engine.config import EngineConfig, ModelConfig
from sarathi_engine.launch import config_from_json, dist_timeout, placement_from_env, start_pod, start_rank
from sarathi_engine.model_store import resolve_model
from sarathi_engine.pipeline import serve

log = logging.getLogger("sarathi.worker")


class HealthServer:
    """GET /health (the process is up) and GET /ready (this pod's ranks are serving), in a thread."""

    def __init__(self, host: str, port: int) -> None:
        self.ready = False
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/health", lambda _: web.json_response({"status": "ok"}))
        app.router.add_get("/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, host, port).start())
        threading.Thread(target=self._loop.run_forever, name="health", daemon=True).start()

    async def _ready(self, _request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)


def run_pod(config: EngineConfig, host: str, port: int) -> int:
    """Run this pod's ranks until rank 0 stops them (0) or a peer is lost (1)."""
    placement = placement_from_env(config.parallel, os.environ)
    health = HealthServer(host, port)
    log.info("pod %d of %d: ranks %d-%d, joining rank 0 at %s", placement.pod, placement.pods,
             placement.ranks.start, placement.ranks.stop - 1, placement.master)

    def draining(*_) -> None:
        # Rank 0 decides when the engine stops; until then this pod keeps its share running.
        health.ready = False

    signal.signal(signal.SIGTERM, draining)
    folder = resolve_model(config.model)
    try:
        runner, state, children = start_pod(config, ModelConfig.from_folder(folder, config.dtype), folder, placement)
    except Exception:
        log.exception("pod %d could not join the engine", placement.pod)
        return 1
    health.ready = True
    try:
        serve(runner, state, dist_timeout())
    except Exception:
        log.exception("pod %d lost the engine", placement.pod)
        children.kill()
        return 1
    finally:
        health.ready = False
    children.wait(timeout=10)
    return 0


def die_with_parent(parent: int) -> None:
    """A child rank must not outlive the process that started it, even if that one was killed
    while this rank waits for a message that will never come."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a multi-process engine (started by the engine)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--local-rank", type=int, required=True)
    parser.add_argument("--master", required=True, help="host:port of rank 0")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process that started this rank")
    parser.add_argument("--config", required=True, help="the engine settings as JSON")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s: %(message)s")
    config = config_from_json(args.config)
    folder = resolve_model(config.model)
    try:
        runner, state = start_rank(config, ModelConfig.from_folder(folder, config.dtype), folder, args.rank,
                                   args.local_rank, args.master)
        serve(runner, state, dist_timeout())
    except Exception:
        log.exception("rank %d lost the engine", args.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
