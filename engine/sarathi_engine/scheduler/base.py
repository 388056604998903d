"""What every policy shares: the waiting queue and running list, admission against the block
manager, preemption by recompute of the youngest running sequence when blocks run out, and the
in-flight set: under pipeline parallelism several batches run at once, and a sequence in one of
them is neither scheduled again nor preempted until its batch lands."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from sarathi_engine.config import SchedulerConfig
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.sequence import Sequence, Status
from sarathi_engine.slo_planner import SloPlanner


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this iteration, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.chunks.append(ScheduledChunk(seq, num_tokens))


class Scheduler(ABC):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, planner: SloPlanner | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.planner = planner  # sizes the sarathi policy's prefill chunks under a TBT SLO
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is the youngest
        self.in_flight: set[Sequence] = set()
        self.num_preemptions = 0

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Choose the next iteration's batch."""

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def launch(self, plan: SchedulerOutput) -> None:
        """The plan's batch has started: its sequences are out of reach until it lands."""
        self.in_flight.update(c.seq for c in plan.chunks)

    def land(self, plan: SchedulerOutput) -> None:
        self.in_flight.difference_update(c.seq for c in plan.chunks)

    def ready(self) -> list[Sequence]:
        """The running sequences a new batch may take: those not in flight."""
        return [s for s in self.running if s not in self.in_flight]

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def admit(self, seq: Sequence) -> bool:
        """Move the head of the waiting queue into running with its cached prefix and blocks for
        all of its other tokens, so a prefill never needs a block mid-way; keeps the watermark
        free unless nothing is running."""
        if not self.blocks.admit(seq, keep_watermark=bool(self.running)):
            return False
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for num_tokens more tokens, preempting the youngest running sequences
        as needed. False when seq itself was the youngest and had to go."""
        target = seq.num_computed_tokens + num_tokens
        while not self.blocks.can_grow(seq, target):
            # An in-flight batch is still writing its sequences' blocks: never take those.
            victim = next(s for s in reversed(self.running) if s not in self.in_flight)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, target)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule_decodes(self, out: SchedulerOutput, limit: int) -> None:
        """One token for each ready decode, oldest first, at most `limit` of them."""
        for seq in [s for s in self.ready() if s.is_decoding]:
            if out.num_tokens >= limit:
                return
            if seq.status is Status.RUNNING and self.make_room(seq, 1):
                out.add(seq, 1)
