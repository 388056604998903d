"""Client of the engine's admin API (`/admin/config` on port 8000, Bearer token): the one way the
operator and `sarathi autotune` change a running engine's settings (settings.py names them)."""

import asyncio

import aiohttp

from .names import HTTP_PORT

TIMEOUT = aiohttp.ClientTimeout(total=5)


class AdminError(Exception):
    pass


def pod_url(pod_ip: str) -> str:
    return f"http://{pod_ip}:{HTTP_PORT}"


async def push_settings(session: aiohttp.ClientSession, base_url: str, token: str, settings: dict) -> None:
    """PATCHes the settings into the engine at base_url and reads them back; raises AdminError
    unless every one of them holds."""
    url = base_url.rstrip("/") + "/admin/config"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with session.patch(url, json=settings, headers=headers, timeout=TIMEOUT) as resp:
            if resp.status >= 300:
                raise AdminError(f"PATCH /admin/config answered {resp.status}: {(await resp.text())[:200]}")
        async with session.get(url, headers=headers, timeout=TIMEOUT) as resp:
            if resp.status >= 300:
                raise AdminError(f"GET /admin/config answered {resp.status}")
            now = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise AdminError(f"{type(e).__name__}: {e}") from e
    wrong = {k: now.get(k) for k, v in settings.items() if now.get(k) != v}
    if wrong:
        raise AdminError(f"engine reports {wrong} after setting {settings}")
    return None
