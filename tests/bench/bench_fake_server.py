"""A scripted OpenAI-style SSE server on 127.0.0.1 for the load generator's tests."""
import asyncio
import json

from aiohttp import web


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app(tokens_per_chunk, gap=0.02, reject_continuous=False, report_delay=None, fail_status=None):
    """Streams max_tokens tokens, grouped per chunk as tokens_per_chunk says, gap seconds apart."""
    seen = []

    async def completions(request):
        body = await request.json()
        seen.append(body)
        options = body.get("stream_options") or {}
        if reject_continuous and "continuous_usage_stats" in options:
            return web.json_response({"error": {"message": "unknown field"}}, status=400)
        if fail_status:
            return web.json_response({"error": {"message": "busy"}}, status=fail_status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await stream(body, options, response)
        except ConnectionResetError:  # the client went away, as decode calibration does on purpose
            pass
        return response

    async def stream(body, options, response):
        total, sent, i = body["max_tokens"], 0, 0
        while sent < total:
            await asyncio.sleep(gap)
            n = min(tokens_per_chunk[i % len(tokens_per_chunk)], total - sent)
            sent, i = sent + n, i + 1
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "ab" * n, "finish_reason": None}]}
            if options.get("continuous_usage_stats"):
                chunk["usage"] = {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent}
            if report_delay is not None and i == 1:
                chunk["sarathi"] = {"scheduling_delay": report_delay}
            await response.write(sse(chunk))
        if options.get("include_usage"):
            await response.write(sse({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                                               "completion_tokens": sent}}))
        await response.write(b"data: [DONE]\n\n")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    return app, seen


async def with_server(app, body):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


class ThreadedServer:
    """The scripted app served from its own thread and event loop, for code that runs asyncio.run itself."""

    def __init__(self, app):
        import threading

        self.app, self.loop = app, asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        self.runner = web.AppRunner(self.app)
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
