"""vLLM's original policy (prefill-prioritising, no chunking): whenever a whole prompt can be
admitted, the iteration runs only prefills, stalling every running decode; otherwise it decodes
all running requests."""
from __future__ import annotations

from sarathi_engine.scheduler.base import Scheduler, SchedulerOutput


class VLLMScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        limit = self.config.max_batched_tokens_unchunked
        out = SchedulerOutput()
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if out.num_tokens + seq.num_uncomputed > limit or not self.admit(seq):
                break
            out.add(seq, seq.num_uncomputed)
        if not out.chunks:
            self.schedule_decodes(out, limit)
        return out
