"""`sarathi serve`: start listening at once (liveness answers while the model loads), load the
engine in a worker thread, serve until SIGTERM or SIGINT, then drain: /ready turns false, new
requests get 503, in-flight requests finish within the grace period, exit 0. If the engine dies,
exit 1. On a pod other than pod 0 of a multi-pod engine (RANK != 0) it runs that pod's ranks
instead, answering only /health and /ready (sarathi_engine.worker.run_pod)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import prometheus_client
from aiohttp import web

from sarathi_engine.config import make_engine_config
from sarathi_engine.engine import LLMEngine
from sarathi_engine.flags import engine_kwargs
from sarathi_engine.launch import placement_from_env
from sarathi_engine.server.app import ServerState, build_app
from sarathi_engine.server.async_engine import AsyncEngine
from sarathi_engine.server.metrics import ServerMetrics
from sarathi_engine.worker import run_pod

log = logging.getLogger("sarathi.server")


async def serve(args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0
    state = ServerState(engine=None, served_model_name=args.served_model_name or args.model, max_model_len=0,
                        admin_token=os.environ.get("SARATHI_ADMIN_TOKEN") or None,
                        api_key=args.api_key or os.environ.get("SARATHI_API_KEY") or None,
                        stall_timeout=args.stall_timeout or None)
    runner = web.AppRunner(build_app(state, args.max_request_bytes), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("listening on http://%s:%s, loading %s", args.host, args.port, args.model)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def engine_failed() -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    try:
        engine = await loop.run_in_executor(None, LLMEngine, make_engine_config(**engine_kwargs(args)))
    except Exception as error:
        log.error("could not start the engine: %s", error)
        await runner.cleanup()
        return 1
    async_engine = AsyncEngine(engine, ServerMetrics(engine, state.served_model_name), args.max_waiting)
    async_engine.on_failure = engine_failed
    async_engine.start(loop)
    state.max_model_len = engine.config.scheduler.max_model_len
    state.engine = async_engine
    log.info("ready: %s, policy %s, token budget %s", state.served_model_name, args.policy, args.token_budget)

    if not stop.is_set():
        await stop.wait()
    state.draining = True
    if exit_code == 0:
        log.info("draining %d in-flight requests (grace %ss)", async_engine.num_in_flight, args.grace_period)
        deadline = loop.time() + args.grace_period
        while async_engine.num_in_flight and async_engine.alive and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the last responses leave the sockets
    await runner.cleanup()
    async_engine.stop()
    engine.shutdown()  # the other ranks exit 0 on a clean stop
    return exit_code


def add_serve_args(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the name clients use; default: --model")
    parser.add_argument("--api-key", default=None,
                        help="require it as a Bearer token on /v1/* (or set SARATHI_API_KEY, which keeps it off "
                             "the command line)")
    parser.add_argument("--max-waiting", type=int, default=1024, help="beyond this many waiting requests: 429")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20)
    parser.add_argument("--grace-period", type=float, default=30.0, help="seconds to drain on SIGTERM")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="/health fails once the engine has had work and finished no step for this many "
                             "seconds (0: never), so that liveness restarts a hung engine")


def run(args) -> int:
    prometheus_client.disable_created_metrics()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = make_engine_config(**engine_kwargs(args))
    if placement_from_env(config.parallel, os.environ).pod != 0:
        return run_pod(config, args.host, args.port)  # a worker pod: its ranks, /health and /ready only
    return asyncio.run(serve(args))
