"""Sarathi-Serve's stall-free batching: every iteration fills the token budget with, in order,
one token for each running decode, chunks of prompts already being prefilled, and chunks of new
requests (first come, first served). A long prompt never stalls a running decode."""
from __future__ import annotations

from sarathi_engine.scheduler.base import Scheduler, SchedulerOutput
from sarathi_engine.sequence import Status


class SarathiScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        budget = self.config.token_budget
        out = SchedulerOutput()
        self.schedule_decodes(out, budget)
        for seq in [s for s in self.ready() if not s.is_decoding]:
            if out.num_tokens >= budget:
                return out
            if seq.status is Status.RUNNING:
                out.add(seq, min(seq.num_uncomputed, budget - out.num_tokens))
        while self.waiting and out.num_tokens < budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.admit(seq):
                break
            out.add(seq, min(seq.num_uncomputed, budget - out.num_tokens))
        return out
