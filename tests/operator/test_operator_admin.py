"""The admin client against a small HTTP server that follows the engine's admin contract."""

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sarathi_operator import admin

TOKEN = "t0k"


def engine_app(report_offset=0):
    state = {"token_budget": 512}

    def authorised(request):
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def get_config(request):
        if not authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        return web.json_response({"token_budget": state["token_budget"] + report_offset})

    async def patch_config(request):
        if not authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        state["token_budget"] = (await request.json())["token_budget"]
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/admin/config", get_config)
    app.router.add_patch("/admin/config", patch_config)
    return app, state


async def serve(app, host):
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 8000).start()
    return runner


def run(coro):
    return asyncio.run(coro)


async def set_budget(app, budget, token=TOKEN, host="127.0.0.61"):
    runner = await serve(app, host)
    try:
        async with aiohttp.ClientSession() as session:
            await admin.set_token_budget(session, host, token, budget)
    finally:
        await runner.cleanup()


def test_sets_and_verifies_the_budget():
    app, state = engine_app()
    run(set_budget(app, 2048))
    assert state["token_budget"] == 2048


def test_a_wrong_token_is_an_admin_error():
    app, state = engine_app()
    with pytest.raises(admin.AdminError, match="401"):
        run(set_budget(app, 2048, token="wrong"))
    assert state["token_budget"] == 512


def test_a_budget_that_does_not_hold_is_an_admin_error():
    app, _ = engine_app(report_offset=1)
    with pytest.raises(admin.AdminError, match="reports token_budget 2049 after setting 2048"):
        run(set_budget(app, 2048))


def test_an_unreachable_engine_is_an_admin_error():
    async def nobody_listening():
        async with aiohttp.ClientSession() as session:
            await admin.set_token_budget(session, "127.0.0.62", TOKEN, 64)

    with pytest.raises(admin.AdminError, match="Connect"):
        run(nobody_listening())
