"""The admin client against a small HTTP server that follows the engine's admin contract (the
real engines are in autotune/test_autotune_pipeline.py)."""

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sarathi_operator import admin

TOKEN = "t0k"


def engine_app(report_offset=0):
    state = {"token_budget": 512, "tbt_slo_ms": None, "slo_margin": 1.0}

    def authorised(request):
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def get_config(request):
        if not authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        return web.json_response({**state, "token_budget": state["token_budget"] + report_offset})

    async def patch_config(request):
        if not authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        state.update(await request.json())
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


async def set_budget(app, budget, token=TOKEN, host="127.0.0.61", **more):
    runner = await serve(app, host)
    try:
        async with aiohttp.ClientSession() as session:
            await admin.push_settings(session, admin.pod_url(host), token, {"token_budget": budget, **more})
    finally:
        await runner.cleanup()


def test_sets_and_verifies_the_settings():
    app, state = engine_app()
    run(set_budget(app, 2048, tbt_slo_ms=150, slo_margin=0.8))
    assert state == {"token_budget": 2048, "tbt_slo_ms": 150, "slo_margin": 0.8}


def test_a_wrong_token_is_an_admin_error():
    app, state = engine_app()
    with pytest.raises(admin.AdminError, match="401"):
        run(set_budget(app, 2048, token="wrong"))
    assert state["token_budget"] == 512


def test_a_budget_that_does_not_hold_is_an_admin_error():
    app, _ = engine_app(report_offset=1)
    with pytest.raises(admin.AdminError, match="engine reports {'token_budget': 2049} after setting"):
        run(set_budget(app, 2048))


def test_an_unreachable_engine_is_an_admin_error():
    async def nobody_listening():
        async with aiohttp.ClientSession() as session:
            await admin.push_settings(session, admin.pod_url("127.0.0.62"), TOKEN, {"token_budget": 64})

    with pytest.raises(admin.AdminError, match="Connect"):
        run(nobody_listening())
