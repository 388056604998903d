"""The step loop: schedule -> execute -> sample -> update.

add_request() and abort_request() may be called from any thread: they validate at once and
queue the change, which the next step() applies, so scheduler state is only touched by the
thread that steps.

When the model spans several processes this is rank 0: it starts the other ranks of its pod,
and under pipeline parallelism keeps up to pp_size batches in flight, each step launching one and
landing the oldest. If another rank dies, step() raises RankFailure and the engine stays dead.
"""
from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sarathi_engine.config import EngineConfig, ModelConfig, check_tbt_slo_ms, check_token_budget
from sarathi_engine.detokenizer import IncrementalDetokenizer, find_stop
from sarathi_engine.distributed import shutdown_distributed
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.launch import LocalRanks, dist_timeout, placement_from_env, start_pod
from sarathi_engine.device import probe_cuda, resolve_device
from sarathi_engine.model_runner import Batch, ModelRunner
from sarathi_engine.model_store import resolve_model
from sarathi_engine.pipeline import Driver, RankFailure, StageTiming
from sarathi_engine.grammar import Grammars
from sarathi_engine.sampler import Sampled, TokenLogprobs
from sarathi_engine.sampling_params import InvalidParam, SamplingParams
from sarathi_engine.scheduler import SchedulerOutput, make_scheduler
from sarathi_engine.sequence import Sequence
from sarathi_engine.slo_planner import BatchShape, SloPlanner, shape_of
from sarathi_engine.threads import set_engine_threads


HEARTBEAT = 2.0  # seconds without a batch after which check_health() asks every rank to answer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # output text so far (stop strings cut off)
    new_token_ids: list[int]  # since the previous output of this request
    new_text: str
    logprobs: list[TokenLogprobs]  # one per output token so far, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs] | None  # prompt tokens 1.., when asked
    cumulative_logprob: float  # of the output tokens, when the request asked for logprobs
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    arrival_time: float
    first_scheduled_time: float | None
    num_preemptions: int


@dataclass
class IterationStats:
    start: float
    duration: float
    schedule_time: float
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    token_budget: int
    predicted: float | None = None  # seconds, the planner's cost model's prediction before it ran
    infeasible_iterations: int = 0  # the planner's count so far
    limited_iterations: int = 0  # the planner's count so far


@dataclass
class _Tracked:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    tokens_sent: int = 0
    text_sent: int = 0
    stop_holdback: int = 0
    text: str = ""


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Flight:
    """A launched batch, until it lands."""

    plan: SchedulerOutput
    batch: Batch
    start: float
    schedule_time: float
    token_budget: int
    sampled: list[Sampled] | None  # None until collected from the last stage
    shape: BatchShape | None  # for the planner's cost model
    cut: bool  # the planner cut its prefill to fit the SLO


def read_eos_token_ids(folder: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    generation_config = folder / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, iteration_history: int = 100_000) -> None:
        from transformers import AutoTokenizer

        self.config = config
        folder = resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(folder, config.dtype)
        sched = config.scheduler
        context = self.model_config.max_position_embeddings
        if sched.max_model_len is not None and sched.max_model_len > context:
            raise ValueError(f"max_model_len {sched.max_model_len} exceeds the model's context of {context} tokens")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_token_ids = read_eos_token_ids(folder, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.eos_token_ids, self.model_config.vocab_size)
        placement = placement_from_env(config.parallel, os.environ)
        if placement.pod != 0:
            raise ValueError(f"this is pod {placement.pod} of {placement.pods}: only pod 0 runs the engine's "
                             "scheduler; the others run sarathi_engine.worker.run_pod (sarathi serve does so)")
        if sched.tbt_slo_ms is not None and config.parallel.pipeline_parallel_size > 1:
            raise ValueError("tbt_slo_ms: per-iteration SLO planning does not support pipeline parallelism yet "
                             "(each stage would need a cost model of its own)")
        self.driver: Driver | None = None
        self.local_ranks: LocalRanks | None = None
        self.failure: BaseException | None = None
        if config.parallel.world_size == 1:
            set_engine_threads()
            self.runner = ModelRunner(self.model_config, folder, config.cache, resolve_device(config.device, probe_cuda()),
                                      config.seed, sched, config.attention_backend)
        else:
            self.runner, state, self.local_ranks = start_pod(config, self.model_config, folder, placement)
            self.driver = Driver(self.runner, state, dist_timeout())
        self._depth = config.parallel.pipeline_parallel_size
        self._in_flight: deque[_Flight] = deque()
        self._deferred_aborts: set[str] = set()
        self._last_contact = time.monotonic()
        capacity = self.runner.num_blocks * self.runner.block_size
        if sched.max_model_len is None:  # as long as the model allows and one sequence fits the cache
            sched.max_model_len = min(context, capacity)
        elif capacity < sched.max_model_len:
            self.shutdown()
            raise ValueError(
                f"KV cache holds {capacity} tokens, fewer than max_model_len {sched.max_model_len}: "
                "give it more memory or lower max_model_len"
            )
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size, config.cache.watermark,
                                   config.cache.prefix_caching)
        # Fitted from every iteration under the sarathi policy, so an SLO set live plans at once.
        self.planner = SloPlanner(sched) if sched.policy == "sarathi" and self._depth == 1 else None
        self.scheduler = make_scheduler(sched, self.blocks, self.planner)
        self.iterations: deque[IterationStats] = deque(maxlen=iteration_history)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._ids_lock = threading.Lock()
        self._ids_in_use: set[str] = set()
        if sched.tbt_slo_ms is not None:
            self.calibrate()

    def calibrate(self) -> None:
        """Seed the SLO planner's cost model before any request: a few prompts of random tokens,
        chunked by the token budget at several contexts and then decoding together, run to
        completion. Their iterations stay out of the history."""
        budget, limit = self.token_budget, self.config.scheduler.max_model_len
        lengths = [min(n, limit - 17) for n in (2 * budget, budget // 2, 48, 8)]
        rng = random.Random(0)
        for i, n in enumerate(lengths):
            prompt = [rng.randrange(3, self.model_config.vocab_size) for _ in range(max(n, 1))]
            self.add_request(f"calibration-{i}", prompt, SamplingParams(max_tokens=16, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        self.iterations.clear()

    # --- called from any thread -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        grammar = self.check_params(params)
        seq = Sequence(request_id, ids, params, arrival_time)
        seq.end_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        if grammar is not None:
            seq.matcher = self.grammars.matcher(grammar)
        with self._ids_lock:
            if request_id in self._ids_in_use:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._ids_in_use.add(request_id)
        self._inbox.put(seq)

    def check_params(self, params: SamplingParams) -> str | None:
        """An InvalidParam for what SamplingParams cannot check alone: token ids outside this
        model's vocabulary, or a JSON schema the grammar cannot hold; else the schema's compiled
        grammar (None without one)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidParam(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})", "logit_bias")
        if params.json_schema is None:
            return None
        try:
            return self.grammars.compile(params.json_schema)
        except ValueError as e:
            raise InvalidParam(str(e), "json_schema") from None

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, or a ValueError saying what is wrong with it."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        limit = self.config.scheduler.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {limit}, which leaves no room to generate")
        return ids

    @property
    def token_budget(self) -> int:
        return self.config.scheduler.token_budget

    def set_token_budget(self, value: int) -> None:
        """Takes effect from the next iteration."""
        self.config.scheduler.token_budget = self.check_live_token_budget(value)

    def check_live_token_budget(self, value: object) -> int:
        """A budget this engine can take live: never above the one its warm-up covered."""
        ceiling = self.config.scheduler.max_token_budget
        if check_token_budget(value) > ceiling:
            raise ValueError(f"token_budget {value} is above {ceiling}, the largest this engine warmed up for: "
                             "restart it with --max-token-budget (or --token-budget) at least that large")
        return value

    @property
    def tbt_slo_ms(self) -> float | None:
        return self.config.scheduler.tbt_slo_ms

    def set_tbt_slo_ms(self, value: float | None) -> None:
        """The TBT the sarathi policy plans each iteration's chunks for (None: the budget alone),
        from the next iteration."""
        if self.planner is None:
            raise ValueError("tbt_slo_ms needs the sarathi policy without pipeline parallelism")
        self.config.scheduler.tbt_slo_ms = check_tbt_slo_ms(value)

    # --- the stepping thread ----------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked) or not self._inbox.empty()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        """Launch the next batch if the pipeline has room, and land the oldest when it is full or
        nothing else can start; the outputs of the requests that moved."""
        try:
            self.check_health()
            outputs = self._drain_inbox()
            launched = len(self._in_flight) < self._depth and self._launch()
            if self._in_flight and (len(self._in_flight) == self._depth or not launched):
                outputs += self._land(self._in_flight.popleft())
            return outputs
        except Exception as error:
            if self.driver is not None:  # the ranks no longer agree on what runs next
                self._fail(error)
            raise

    def check_health(self) -> None:
        """Raise RankFailure if the engine has lost a rank. Call it from the stepping thread
        while idle too: after HEARTBEAT seconds without a batch it makes every rank answer."""
        if self.failure is not None:
            raise RankFailure(f"the engine is down: {self.failure}")
        if self.driver is None:
            return
        try:
            self.local_ranks.check()
            if not self._in_flight and time.monotonic() - self._last_contact > HEARTBEAT:
                self.driver.report()
                self._last_contact = time.monotonic()
        except Exception as error:
            self._fail(error)
            raise

    def _launch(self) -> bool:
        start = time.monotonic()
        plan = self.scheduler.schedule()
        scheduled = time.monotonic()
        if not plan.chunks:
            return False
        if self._depth > 1:  # otherwise every batch lands within the step that launched it
            self.scheduler.launch(plan)
        shape = shape_of(plan.chunks) if self.planner is not None else None
        cut = self.planner is not None and self.planner.active and self.planner.cut
        batch = self.runner.prepare(plan.chunks, self.blocks)
        sampled = self.runner.execute(batch) if self.driver is None else self.driver.launch(batch)
        self._in_flight.append(_Flight(plan, batch, start, scheduled - start, self.token_budget, sampled, shape, cut))
        return True

    def _land(self, flight: _Flight) -> list[RequestOutput]:
        batch = flight.batch
        sampled = flight.sampled if flight.sampled is not None else self.driver.collect(batch)
        if self._depth > 1:
            self.scheduler.land(flight.plan)
        now = self._last_contact = time.monotonic()
        predicted = None
        if flight.shape is not None:
            predicted = self.planner.model.predict(flight.shape)
            self.planner.model.observe(flight.shape, now - flight.start, flight.cut)
        prefill_tokens = sum(c.num_tokens for c in batch.chunks if not c.seq.is_decoding)
        outputs = []
        for chunk, result in zip(batch.chunks, sampled):
            seq = chunk.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = flight.start
            seq.num_computed_tokens += chunk.num_tokens
            self.blocks.register_computed(seq)
            seq.prompt_logprobs.extend(result.prompt_logprobs)
            if result.token is not None:
                outputs.append(self._append_token(self._tracked[seq.request_id], result))
        num_tokens = flight.plan.num_tokens
        self.iterations.append(IterationStats(
            start=flight.start, duration=now - flight.start, schedule_time=flight.schedule_time,
            num_tokens=num_tokens, num_prefill_tokens=prefill_tokens, num_decode_tokens=num_tokens - prefill_tokens,
            num_seqs=len(batch.chunks), token_budget=flight.token_budget, predicted=predicted,
            infeasible_iterations=self.planner.infeasible if self.planner is not None else 0,
            limited_iterations=self.planner.limited if self.planner is not None else 0,
        ))
        return outputs + self._abort_deferred()

    def _abort_deferred(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self._deferred_aborts):
            tracked = self._tracked.get(request_id)
            if tracked is None or tracked.seq not in self.scheduler.in_flight:
                self._deferred_aborts.discard(request_id)
                if tracked is not None:
                    outputs.append(self._finish(tracked, "abort"))
        return outputs

    def _fail(self, error: BaseException) -> None:
        self.failure = self.failure or error
        if self.local_ranks is not None:
            self.local_ranks.kill()

    def stage_timings(self) -> list[StageTiming]:
        """Per-rank busy and total time of its pipeline stage (one entry per rank); the engine
        must have nothing in flight."""
        if self.driver is None:
            raise ValueError("stage timings exist only when the model spans several processes")
        if self._in_flight:
            raise ValueError("stage timings need the pipeline drained: step until no request is unfinished")
        return self.driver.report()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the other ranks (a no-op in a single process). In-flight batches are dropped."""
        if self.driver is None:
            return
        driver, self.driver = self.driver, None
        if self.failure is None and not self._in_flight:
            try:
                driver.stop()
            except RankFailure:
                pass  # already going down; the children are killed below
        self.local_ranks.wait(timeout)
        shutdown_distributed()
        self.failure = self.failure or RuntimeError("the engine was shut down")

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            item = self._inbox.get()
            if isinstance(item, _Abort):
                tracked = self._tracked.get(item.request_id)
                if tracked is not None and tracked.seq in self.scheduler.in_flight:
                    self._deferred_aborts.add(item.request_id)  # its batch is still writing its blocks
                elif tracked is not None:
                    outputs.append(self._finish(tracked, "abort"))
            else:
                self._tracked[item.request_id] = _Tracked(
                    item, IncrementalDetokenizer(self.tokenizer, item.prompt_token_ids),
                    stop_holdback=max((len(s) for s in item.params.stop), default=1) - 1,
                )
                self.scheduler.add(item)
        return outputs

    def _append_token(self, tracked: _Tracked, sampled: Sampled) -> RequestOutput:
        seq, params, token = tracked.seq, tracked.seq.params, sampled.token
        seq.output_token_ids.append(token)
        if sampled.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
        may_stop = len(seq.output_token_ids) > params.min_tokens
        if token in seq.end_token_ids:
            return self._finish(tracked, "stop")
        delta = tracked.detokenizer.push(token)
        tracked.text = tracked.detokenizer.text
        if params.stop and may_stop:
            at = find_stop(tracked.text, len(delta), params.stop)
            if at != -1:
                tracked.text = tracked.text[:at]
                return self._finish(tracked, "stop")
        if seq.matcher is not None and (not seq.matcher.accept(token) or seq.matcher.done):
            return self._finish(tracked, "stop")  # the JSON is complete (a refused token cannot be drawn)
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.config.scheduler.max_model_len:
            return self._finish(tracked, "length")
        return self._output(tracked)

    def _finish(self, tracked: _Tracked, reason: str) -> RequestOutput:
        seq = tracked.seq
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        del self._tracked[seq.request_id]
        with self._ids_lock:
            self._ids_in_use.discard(seq.request_id)
        return self._output(tracked)

    def _output(self, tracked: _Tracked) -> RequestOutput:
        seq = tracked.seq
        # While a stop string could still be completing, hold back its possible prefix.
        visible = len(tracked.text) if seq.is_finished else max(tracked.text_sent, len(tracked.text) - tracked.stop_holdback)
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=tracked.text[:visible],
            new_token_ids=seq.output_token_ids[tracked.tokens_sent:],
            new_text=tracked.text[tracked.text_sent:visible],
            logprobs=list(seq.logprobs),
            prompt_logprobs=list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
            cumulative_logprob=seq.cumulative_logprob,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            num_preemptions=seq.num_preemptions,
        )
        tracked.tokens_sent, tracked.text_sent = len(seq.output_token_ids), visible
        return out
