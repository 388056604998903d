"""Client of the engine's admin API (`/admin/config` on port 8000, Bearer token)."""

import asyncio

import aiohttp

from .names import HTTP_PORT

TIMEOUT = aiohttp.ClientTimeout(total=5)


class AdminError(Exception):
    pass


async def set_token_budget(session: aiohttp.ClientSession, pod_ip: str, token: str, budget: int) -> None:
    """Sets a pod's engine's token budget and reads it back; raises AdminError unless it holds."""
    await set_engine_token_budget(session, f"http://{pod_ip}:{HTTP_PORT}", token, budget)


async def set_engine_token_budget(session: aiohttp.ClientSession, base_url: str, token: str, budget: int) -> None:
    """The same for an engine at any URL."""
    url = base_url.rstrip("/") + "/admin/config"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with session.patch(url, json={"token_budget": budget}, headers=headers, timeout=TIMEOUT) as resp:
            if resp.status >= 300:
                raise AdminError(f"PATCH /admin/config answered {resp.status}: {(await resp.text())[:200]}")
        async with session.get(url, headers=headers, timeout=TIMEOUT) as resp:
            if resp.status >= 300:
                raise AdminError(f"GET /admin/config answered {resp.status}")
            now = (await resp.json()).get("token_budget")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise AdminError(f"{type(e).__name__}: {e}") from e
    if now != budget:
        raise AdminError(f"engine reports token_budget {now} after setting {budget}")
