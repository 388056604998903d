"""The bridge between the event loop and the engine: the engine steps in its own thread, so the
loop never waits on model work, and feeds each HTTP request's asyncio queue. Latency metrics are
taken here, when a token leaves the engine."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sarathi_engine.engine import LLMEngine, RequestOutput
from sarathi_engine.sampling_params import SamplingParams
from sarathi_engine.server.metrics import ServerMetrics

log = logging.getLogger("sarathi.server")


class Overloaded(Exception):
    pass


class EngineDead(Exception):
    pass


@dataclass
class _Request:
    queue: asyncio.Queue  # shared by the engine requests of one submission
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


class Submission:
    """The engine requests made for one HTTP request (one per prompt), read as one stream."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue) -> None:
        self.engine = engine
        self.index = {request_id: i for i, request_id in enumerate(request_ids)}
        self.unfinished = set(request_ids)
        self.queue = queue

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise EngineDead(f"the engine failed: {item}") from item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield self.index[item.request_id], item

    def abort(self) -> None:
        """Abort whatever has not finished (the client left, or the handler failed)."""
        for request_id in self.unfinished:
            self.engine.engine.abort_request(request_id)
        self.unfinished = set()
        self.engine.wake()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.failure: BaseException | None = None
        self.on_failure = lambda: None  # called on the event loop when stepping fails
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_progress = time.monotonic()  # the last step's end, or when work arrived at an idle engine

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def stalled_for(self, now: float) -> float:
        """Seconds the engine has had work and finished no step (0 while idle or stepping on)."""
        if not self.engine.has_unfinished_requests():
            return 0.0
        return max(0.0, now - self._last_progress)

    def submit(self, prompts: list[tuple[list[int], SamplingParams]], request_id: str) -> Submission:
        """Queue one engine request per prompt; raises before queueing any if the engine is dead
        or the waiting queue is full."""
        if not self.alive:
            raise EngineDead("the engine has stopped")
        if self._num_waiting() + len(prompts) > self.max_waiting:
            raise Overloaded(f"server overloaded: {self.max_waiting} requests already waiting; retry later")
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        arrival = time.monotonic()
        for engine_id, (prompt, params) in zip(ids, prompts):
            with self._lock:
                self._requests[engine_id] = _Request(queue, arrival)
            self.engine.add_request(engine_id, prompt, params, arrival_time=arrival)
            self.metrics.prompt_tokens.inc(len(prompt))
        self.wake()
        return Submission(self, ids, queue)

    def wake(self) -> None:
        self._wake.set()

    def _num_waiting(self) -> int:
        """Requests not yet running: in the scheduler's queue or still in the engine's inbox."""
        return max(self.engine.num_waiting, len(self._requests) - self.engine.num_running)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished_requests():
                    self.engine.check_health()  # a rank lost while idle must bring the server down too
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self._last_progress = time.monotonic()  # work that arrives now has waited for nothing
                    continue
                seen = len(self.engine.iterations)
                outputs = self.engine.step()
                now = self._last_progress = time.monotonic()
                if len(self.engine.iterations) > seen:
                    self.metrics.observe_iteration(self.engine.iterations[-1], self.engine)
                for out in outputs:
                    self._deliver(out, now)
        except BaseException as error:  # the server must learn of it, never hang
            log.exception("engine step failed")
            self.failure = error
            with self._lock:
                queues = {id(r.queue): r.queue for r in self._requests.values()}
            for queue in queues.values():
                self._loop.call_soon_threadsafe(queue.put_nowait, error)
            self._loop.call_soon_threadsafe(self.on_failure)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        with self._lock:
            state = self._requests.get(out.request_id)
            if out.finished:
                self._requests.pop(out.request_id, None)
        if state is None:
            return
        self._observe(state, out, now)
        self._loop.call_soon_threadsafe(state.queue.put_nowait, out)

    def _observe(self, state: _Request, out: RequestOutput, now: float) -> None:
        m = self.metrics
        for _ in out.new_token_ids:
            if state.first_token is None:
                state.first_token = now
                m.ttft.observe(now - state.arrival)
                if out.first_scheduled_time is not None:
                    m.queue.observe(max(0.0, out.first_scheduled_time - state.arrival))
            else:
                m.tbt.observe(now - state.last_token)
            state.last_token = now
        m.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            m.finished(out.finish_reason)
            if state.first_token is not None:
                m.e2e.observe(now - state.arrival)
