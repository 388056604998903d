"""The step loop: schedule -> execute -> sample -> update.

add_request() and abort_request() may be called from any thread: they validate at once and
queue the change, which the next step() applies, so scheduler state is only touched by the
thread that steps.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sarathi_engine.config import EngineConfig, ModelConfig, check_token_budget
from sarathi_engine.detokenizer import IncrementalDetokenizer, find_stop
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.model_runner import ModelRunner, pick_device
from sarathi_engine.model_store import resolve_model
from sarathi_engine.sampling_params import SamplingParams
from sarathi_engine.scheduler import make_scheduler
from sarathi_engine.sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # output text so far (stop strings cut off)
    new_token_ids: list[int]  # since the previous output of this request
    new_text: str
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
        self.runner = ModelRunner(self.model_config, folder, config.cache, pick_device(config.device), config.seed)
        capacity = self.runner.num_blocks * self.runner.block_size
        if sched.max_model_len is None:  # as long as the model allows and one sequence fits the cache
            sched.max_model_len = min(context, capacity)
        elif capacity < sched.max_model_len:
            raise ValueError(
                f"KV cache holds {capacity} tokens, fewer than max_model_len {sched.max_model_len}: "
                "give it more memory or lower max_model_len"
            )
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size, config.cache.watermark)
        self.scheduler = make_scheduler(sched, self.blocks)
        self.iterations: deque[IterationStats] = deque(maxlen=iteration_history)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._ids_lock = threading.Lock()
        self._ids_in_use: set[str] = set()

    # --- called from any thread -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        with self._ids_lock:
            if request_id in self._ids_in_use:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._ids_in_use.add(request_id)
        self._inbox.put(Sequence(request_id, ids, params, arrival_time))

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
        self.config.scheduler.token_budget = check_token_budget(value)

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
        outputs = self._drain_inbox()
        start = time.monotonic()
        plan = self.scheduler.schedule()
        scheduled = time.monotonic()
        if not plan.chunks:
            return outputs
        batch = self.runner.prepare(plan.chunks, self.blocks)
        tokens = self.runner.execute(batch)
        now = time.monotonic()
        prefill_tokens = sum(c.num_tokens for c in batch.chunks if not c.seq.is_decoding)
        for chunk, token in zip(batch.chunks, tokens):
            seq = chunk.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
            seq.num_computed_tokens += chunk.num_tokens
            if token is not None:
                outputs.append(self._append_token(self._tracked[seq.request_id], token))
        self.iterations.append(IterationStats(
            start=start, duration=now - start, schedule_time=scheduled - start, num_tokens=plan.num_tokens,
            num_prefill_tokens=prefill_tokens, num_decode_tokens=plan.num_tokens - prefill_tokens,
            num_seqs=len(plan.chunks), token_budget=self.token_budget,
        ))
        return outputs

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            item = self._inbox.get()
            if isinstance(item, _Abort):
                tracked = self._tracked.get(item.request_id)
                if tracked is not None:
                    outputs.append(self._finish(tracked, "abort"))
            else:
                self._tracked[item.request_id] = _Tracked(
                    item, IncrementalDetokenizer(self.tokenizer, item.prompt_token_ids),
                    stop_holdback=max((len(s) for s in item.params.stop), default=1) - 1,
                )
                self.scheduler.add(item)
        return outputs

    def _append_token(self, tracked: _Tracked, token: int) -> RequestOutput:
        seq, params = tracked.seq, tracked.seq.params
        seq.output_token_ids.append(token)
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return self._finish(tracked, "stop")
        delta = tracked.detokenizer.push(token)
        tracked.text = tracked.detokenizer.text
        if params.stop:
            at = find_stop(tracked.text, len(delta), params.stop)
            if at != -1:
                tracked.text = tracked.text[:at]
                return self._finish(tracked, "stop")
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
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            num_preemptions=seq.num_preemptions,
        )
        tracked.tokens_sent, tracked.text_sent = len(seq.output_token_ids), visible
        return out
