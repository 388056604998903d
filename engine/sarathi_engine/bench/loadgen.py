"""The load generator: streams completions from any OpenAI-compatible /v1/completions URL (ours,
vLLM's) with prompts as token ids, `ignore_eos` and the sampled `max_tokens`, sending each
request at its arrival time, and records when every output token arrived.

Token counting: each request asks for `stream_options.continuous_usage_stats` (vLLM's extension:
`usage` in every chunk), so a chunk carries `completion_tokens - tokens seen` tokens, exact even
when one chunk holds several. A server that refuses it is counted one token per chunk that carries
a choice, even with empty text (a token whose text is held back, e.g. half a UTF-8 character):
our server and vLLM send one chunk per token. The final `usage` (include_usage) is kept as the
request's output token count either way, so a mismatch shows.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from sarathi_engine.bench.records import RequestRecord

COMPLETIONS = "/v1/completions"


class TokenClock:
    """Turns the chunks of one stream into one arrival time per output token."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record

    def on_chunk(self, t: float, chunk: dict) -> None:
        record = self.record
        usage, choices = chunk.get("usage"), chunk.get("choices") or []
        extension = chunk.get("sarathi") or {}
        if extension.get("scheduling_delay") is not None:
            record.server_scheduling_delay = float(extension["scheduling_delay"])
        if usage and usage.get("completion_tokens") is not None:
            record.output_tokens = int(usage["completion_tokens"])
            new = record.output_tokens - len(record.token_times) if choices else 0
        else:
            new = 1 if choices else 0
        record.token_times.extend([t] * max(0, new))


def completion_payload(model: str, prompt: list[int], max_tokens: int, continuous_usage: bool) -> dict:
    options = {"include_usage": True}
    if continuous_usage:
        options["continuous_usage_stats"] = True
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": options}


async def stream_completion(session: aiohttp.ClientSession, url: str, payload: dict,
                            record: RequestRecord) -> RequestRecord:
    """Send one streaming request and fill in record; failures land in record.error."""
    sent = time.perf_counter()
    clock = TokenClock(record)
    try:
        async with session.post(url.rstrip("/") + COMPLETIONS, json=payload) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return record
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                clock.on_chunk(time.perf_counter() - sent, json.loads(data))
        record.end = time.perf_counter() - sent
        if not record.token_times:
            record.error = "no tokens in the response"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


@dataclass
class Load:
    """What one run sends: prompts (token ids), their max_tokens, and send times from the start."""

    prompts: list[list[int]]
    max_tokens: list[int]
    send_times: list[float]

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.max_tokens) == len(self.send_times):
            raise ValueError("prompts, max_tokens and send_times differ in length")


def client_session(timeout_s: float) -> aiohttp.ClientSession:
    # No connection limit: a client-side queue would hide the server's own queueing.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def run_load(url: str, model: str, load: Load, continuous_usage: bool = True, timeout_s: float = 3600,
                   on_sent: Callable[[int], None] | None = None,
                   on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send every request at its time; return the records and the run's duration (first send to
    last response end)."""
    async def one(i: int, record: RequestRecord) -> RequestRecord:
        payload = completion_payload(model, load.prompts[i], load.max_tokens[i], continuous_usage)
        await stream_completion(session, url, payload, record)
        if on_done:
            on_done(record)
        return record

    async with client_session(timeout_s) as session:
        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(load.send_times):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            record = RequestRecord(i, len(load.prompts[i]), load.max_tokens[i], send_time=time.perf_counter() - start)
            tasks.append(asyncio.create_task(one(i, record)))
            if on_sent:
                on_sent(i)
        records = await asyncio.gather(*tasks)
    ends = [r.send_time + r.end for r in records if r.end is not None]
    return list(records), max(ends, default=0.0)


async def served_model(url: str, timeout_s: float = 30) -> str:
    """The first model id the server lists at /v1/models."""
    async with client_session(timeout_s) as session:
        async with session.get(url.rstrip("/") + "/v1/models") as response:
            response.raise_for_status()
            return (await response.json())["data"][0]["id"]


@dataclass(frozen=True)
class ServerTraits:
    continuous_usage: bool  # usage in every chunk, so tokens are counted exactly
    reports_scheduling_delay: bool


async def probe_server(url: str, model: str, prompt: list[int]) -> ServerTraits:
    """One short request asking for usage in every chunk; a server that refuses the field (400)
    is counted by chunks instead. Doubles as the warm-up request."""
    async with client_session(120) as session:
        for continuous in (True, False):
            record = await stream_completion(session, url, completion_payload(model, prompt, 2, continuous),
                                             RequestRecord(0, len(prompt), 2, 0.0))
            if record.ok:
                return ServerTraits(continuous, record.server_scheduling_delay is not None)
            if not (continuous and record.error.startswith("HTTP 400")):
                break
    raise RuntimeError(f"warm-up request to {url} failed: {record.error}")
