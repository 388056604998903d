"""Apply: set the target budget on every engine that runs another one, through its admin API
(PATCH, then read back), all at once and at most `concurrency` at a time. An engine that cannot
be reached is reported and tried again on the next pass; it never holds up the others."""

import asyncio

import aiohttp

from ..admin import AdminError, set_engine_token_budget

CONCURRENCY = 16


async def apply_all(session: aiohttp.ClientSession, engines: dict[str, str], token: str, budget: int,
                    concurrency: int = CONCURRENCY) -> dict[str, str | None]:
    """{key: None when the engine now runs budget, else why not} for engines given as {key: base URL}."""
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str) -> str | None:
        async with gate:
            try:
                await set_engine_token_budget(session, url, token, budget)
            except AdminError as e:
                return str(e)
            return None

    results = await asyncio.gather(*(one(url) for url in engines.values()))
    return dict(zip(engines, results))
