"""FasterTransformer's request-level batching: a batch is formed only when none is running, its
prompts prefilled together, then decoded until every request in it finishes; new requests wait.
Blocks for each request's full length are checked at admission, so a batch is never preempted."""
from __future__ import annotations

from sarathi_engine.kv_cache import blocks_for
from sarathi_engine.scheduler.base import Scheduler, SchedulerOutput
from sarathi_engine.sequence import Sequence


class FasterTransformerScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        limit = self.config.max_batched_tokens_unchunked
        out = SchedulerOutput()
        if self.running:
            self.schedule_decodes(out, limit)
            return out
        reserved = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = blocks_for(self.full_length(seq), self.blocks.block_size)
            # No batch is running, so the whole cache is this batch's to reserve.
            too_long = out.num_tokens + seq.num_uncomputed > limit
            if too_long or reserved + need > self.blocks.num_blocks or not self.admit(seq):
                break
            reserved += need
            out.add(seq, seq.num_uncomputed)
        return out

    def full_length(self, seq: Sequence) -> int:
        remaining = seq.params.max_tokens - len(seq.output_token_ids)
        return min(seq.num_tokens + remaining, self.config.max_model_len)
