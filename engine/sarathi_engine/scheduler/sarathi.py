"""Sarathi-Serve's stall-free batching: every iteration fills the token budget with, in order,
one token for each running decode, chunks of prompts already being prefilled, and chunks of new
requests (first come, first served). A long prompt never stalls a running decode. With a TBT SLO,
the planner also caps each chunk so that the iteration's predicted time stays within it. Both
count only tokens computed: a prompt's cached prefix is neither budgeted nor planned for, though
its chunks' attention over it is."""
from __future__ import annotations

from sarathi_engine.scheduler.base import Scheduler, SchedulerOutput
from sarathi_engine.sequence import Sequence, Status
from sarathi_engine.slo_planner import shape_of


class SarathiScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        budget = self.config.token_budget
        out = SchedulerOutput()
        self.schedule_decodes(out, budget)
        planner = self.planner if self.planner is not None and self.planner.active else None
        shape = shape_of(out.chunks) if planner else None
        if planner:
            planner.account(shape)

        def chunk(seq: Sequence) -> int:
            """Tokens of seq's prompt for this iteration: what the budget leaves, within the SLO."""
            nonlocal shape
            tokens = min(seq.num_uncomputed, budget - out.num_tokens)
            if planner:
                tokens = planner.chunk(shape, seq.num_computed_tokens, tokens)
                shape = shape.with_chunk(tokens, seq.num_computed_tokens)
            return tokens

        for seq in [s for s in self.ready() if not s.is_decoding]:
            if out.num_tokens >= budget:
                return out
            if seq.status is Status.RUNNING:
                tokens = chunk(seq)
                if tokens == 0:
                    return out
                out.add(seq, tokens)
        while self.waiting and out.num_tokens < budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.admit(seq):  # admission finds its cached prefix: the chunk starts after it
                break
            tokens = chunk(seq)
            if tokens == 0:
                break  # admitted, it leads the running prefills next iteration
            out.add(seq, tokens)
        return out
