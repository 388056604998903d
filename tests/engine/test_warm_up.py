"""The warm-up before an engine is ready: the largest batches its configuration can schedule run
once through the model, the logits and the sampler; on CUDA their peak memory sizes the KV cache,
and a live token budget above what was warmed up is refused."""
from __future__ import annotations

import pytest

from sarathi_engine import LLM
from sarathi_engine.config import SchedulerConfig
from sarathi_engine.model_runner import ModelRunner, dummy_inputs, kv_cache_bytes


def test_largest_batches_per_policy():
    assert SchedulerConfig(token_budget=512, max_num_seqs=128).largest_batches(1024) == [[512], [1] * 128]
    # a budget above the longest prompt is filled by several; decodes never exceed the budget
    assert SchedulerConfig(token_budget=64, max_num_seqs=128).largest_batches(40) == [[39, 25], [1] * 64]
    # the policies that never chunk take a whole prompt of max_model_len - 1 tokens at once
    assert SchedulerConfig(policy="vllm", token_budget=256, max_num_seqs=8).largest_batches(1024) == [[1023], [1] * 8]
    assert SchedulerConfig(token_budget=256, max_token_budget=1024, max_num_seqs=4).largest_batches(4096) == [
        [1024], [1] * 4]
    with pytest.raises(ValueError, match="token_budget 512 is above max_token_budget 256"):
        SchedulerConfig(token_budget=512, max_token_budget=256)


def test_dummy_batches_lay_sequences_out_block_after_block():
    inputs = dummy_inputs([5, 2], block_size=4, device="cpu")
    assert inputs.meta.slot_mapping.tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert inputs.meta.block_tables.tolist() == [[0, 1], [2, 0]]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 0, 1] and inputs.logit_rows == [4, 6]


def test_kv_cache_gets_the_share_left_after_the_peak_and_memory_outside_torch():
    gib = 2**30
    assert kv_cache_bytes(80 * gib, 0.9, peak=20 * gib, outside_torch=2 * gib) == 50 * gib


def test_the_largest_batches_run_before_the_engine_takes_requests(tiny_models, monkeypatch):
    seen = []
    forward = ModelRunner.forward

    def spy(self, inputs, hidden=None):
        seen.append(list(inputs.meta.query_lens))
        return forward(self, inputs, hidden)

    monkeypatch.setattr(ModelRunner, "forward", spy)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=96, max_num_seqs=12, kv_cache_memory="16MiB")
    assert seen == [[96], [1] * 12]  # before any request
    out = llm.generate([5, 6, 7], None)[0]
    assert len(out.token_ids) == 16 and len(seen) > 2
