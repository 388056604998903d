"""Orca's iteration-level batching: each iteration decodes every running request and adds whole
new prompts alongside while they fit, so a long prompt makes that iteration long for all."""
from __future__ import annotations

from sarathi_engine.scheduler.base import Scheduler, SchedulerOutput


class OrcaScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        limit = self.config.max_batched_tokens_unchunked
        out = SchedulerOutput()
        self.schedule_decodes(out, limit)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if out.num_tokens + seq.num_uncomputed > limit or not self.admit(seq):
                break
            out.add(seq, seq.num_uncomputed)
        return out
