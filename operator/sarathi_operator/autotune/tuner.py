"""One pass of the outer loop for one deployment: scrape every serving engine's /metrics, sum the
window since the last window the loop acted on, and step the loop (loop.py). What the pass found
is returned for the caller to apply and record: in the operator the reconciler pushes the new
margin (settings.py) and record.py writes the status; `sarathi autotune` pushes it itself.

A window runs from the last pass whose window held enough token gaps to now, so a quiet spell
widens it (up to window_reach) until it holds enough, and no gap produced under an older margin
or SLO counts for a newer one (a new SLO starts a new window).
"""

from dataclasses import dataclass

import aiohttp

from . import fetch, loop
from .aggregate import Scrapes, Window, summarize

KEEP_INTERVALS = 5  # a window may always reach back this many intervals


def window_reach(interval: float, config: loop.LoopConfig) -> float:
    """How far back a window may reach, in seconds (older scrapes are dropped): KEEP_INTERVALS
    intervals, or twice the time a busy engine takes to make min_samples token gaps at the SLO's
    pace, whichever is longer. An iteration that carries decodes makes at least one gap and may
    take up to the SLO, so at a one-second SLO and one decode at a time the 200 gaps a window needs
    take 200 s, which five 10 s intervals can never hold."""
    return max(KEEP_INTERVALS * interval, 2 * config.min_samples * config.slo)


@dataclass(frozen=True)
class Pass:
    time: float
    window: Window
    decision: loop.Decision
    state: loop.LoopState  # the loop's state after the pass, what the status saves
    scrape_errors: dict[str, str]  # engine -> why its /metrics could not be read
    reported: dict[str, dict]  # the live settings each scraped engine runs now


class Tuner:
    """The pipeline's memory for one deployment between passes: the loop's state and the scrapes."""

    def __init__(self, state: loop.LoopState, interval: float):
        self.state = state
        self.interval = interval
        self.scrapes = Scrapes(keep_seconds=KEEP_INTERVALS * interval)
        self.window_start: float | None = None
        self.slo: float | None = None  # the SLO the window is measured against

    async def step(self, session: aiohttp.ClientSession, engines: dict[str, str], config: loop.LoopConfig,
                   now: float) -> Pass:
        """engines: {key: base URL} of every engine that serves now."""
        scraped = await fetch.scrape_all(session, engines)
        snapshots = {s.key: s.snapshot for s in scraped if s.snapshot is not None}
        self.scrapes.keep_seconds = window_reach(self.interval, config)
        self.scrapes.add(now, snapshots)
        if self.window_start is None or config.slo != self.slo:
            self.window_start, self.slo = now, config.slo
        window = summarize(*self.scrapes.increase_since(self.window_start))
        decision, self.state = loop.step(self.state, window.observed(), config)
        if decision.acted:
            self.window_start = now
        return Pass(
            time=now,
            window=window,
            decision=decision,
            state=self.state,
            scrape_errors={s.key: s.error for s in scraped if s.error},
            reported={k: s.settings for k, s in snapshots.items() if s.settings is not None},
        )
