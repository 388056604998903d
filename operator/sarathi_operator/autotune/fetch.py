"""Fetch: scrape /metrics of every serving engine at once, each within a timeout, at most
`concurrency` at a time. A slow or dead engine costs its own scrape, never the others'."""

import asyncio
from dataclasses import dataclass

import aiohttp

from .aggregate import Snapshot, parse

TIMEOUT = aiohttp.ClientTimeout(total=5)
CONCURRENCY = 16


@dataclass(frozen=True)
class Scraped:
    key: str
    snapshot: Snapshot | None
    error: str | None = None


async def scrape(session: aiohttp.ClientSession, key: str, base_url: str,
                 timeout: aiohttp.ClientTimeout = TIMEOUT) -> Scraped:
    try:
        async with session.get(base_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            if resp.status != 200:
                return Scraped(key, None, f"/metrics answered {resp.status}")
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Scraped(key, None, f"{type(e).__name__}: {e}".rstrip(": "))
    try:
        return Scraped(key, parse(text))
    except ValueError as e:
        return Scraped(key, None, f"unreadable /metrics: {e}")


async def scrape_all(session: aiohttp.ClientSession, engines: dict[str, str],
                     timeout: aiohttp.ClientTimeout = TIMEOUT, concurrency: int = CONCURRENCY) -> list[Scraped]:
    """Scrapes of engines given as {key: base URL}, in the same order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str, url: str) -> Scraped:
        async with gate:
            return await scrape(session, key, url, timeout)

    return list(await asyncio.gather(*(one(k, u) for k, u in engines.items())))
