"""One pass of the pipeline for one deployment: fetch -> aggregate -> decide -> apply. What the
pass found is returned for the caller to record (record.py in the operator, a line per pass in
`sarathi autotune`).

The window of a decision runs from the previous decision that had enough samples (or the last
change of the budget) to now, so a quiet spell widens it until it holds enough token gaps (or
iterations),
and no gap produced under an older budget counts for a newer one.
"""

from dataclasses import dataclass, field

import aiohttp

from . import apply, fetch
from .aggregate import Scrapes, Window, summarize
from .decide import Config, Decision, Evidence, State, decide, evidence

# Scrapes older than this many intervals are dropped: the longest a window can grow.
KEEP_INTERVALS = 5


@dataclass(frozen=True)
class Pass:
    time: float
    window: Window
    previous_budget: int
    decision: Decision
    scrape_errors: dict[str, str]  # engine -> why its /metrics could not be read
    applied: list[str]  # engines set to the decided budget in this pass
    apply_errors: dict[str, str]  # engines that still run another budget, and why
    reported: dict[str, int] = field(default_factory=dict)  # budget each scraped engine runs now
    evidence: Evidence | None = None  # the P99 the decision acted on, and of what


class Tuner:
    """The pipeline's memory for one deployment between passes."""

    def __init__(self, state: State, interval: float):
        self.state = state
        self.scrapes = Scrapes(keep_seconds=KEEP_INTERVALS * interval)
        self.window_start: float | None = None

    async def step(self, session: aiohttp.ClientSession, engines: dict[str, str], token: str, config: Config,
                   now: float) -> Pass:
        """engines: {key: base URL} of every engine that serves now."""
        scraped = await fetch.scrape_all(session, engines)
        snapshots = {s.key: s.snapshot for s in scraped if s.snapshot is not None}
        self.scrapes.add(now, snapshots)
        if self.window_start is None:
            self.window_start = now
        total, seconds, counted = self.scrapes.increase_since(self.window_start)
        window = summarize(total, seconds, counted, self.state.budget)
        previous, found = self.state.budget, evidence(window, config)
        decision, self.state = decide(self.state, window, config, now)
        if decision.budget != previous or found is not None:
            self.window_start = now

        reported = {k: s.token_budget for k, s in snapshots.items() if s.token_budget is not None}
        stale = {k: url for k, url in engines.items() if reported.get(k) != decision.budget}
        results = await apply.apply_all(session, stale, token, decision.budget) if stale else {}
        applied = [k for k, error in results.items() if error is None]
        reported.update(dict.fromkeys(applied, decision.budget))
        return Pass(
            time=now,
            window=window,
            previous_budget=previous,
            decision=decision,
            scrape_errors={s.key: s.error for s in scraped if s.error},
            applied=applied,
            apply_errors={k: error for k, error in results.items() if error is not None},
            reported=reported,
            evidence=found,
        )
