"""The scheduler under pipeline parallelism: a sequence in a launched batch is neither scheduled
again nor preempted until that batch lands, under every policy."""
from __future__ import annotations

import pytest

from sarathi_engine.config import POLICIES, SchedulerConfig
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.sampling_params import SamplingParams
from sarathi_engine.scheduler import SchedulerOutput, make_scheduler
from sarathi_engine.sequence import Sequence


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=100))


def scheduler(policy: str, budget: int = 64, blocks: int = 1000):
    config = SchedulerConfig(policy=policy, token_budget=budget, max_model_len=4096)
    return make_scheduler(config, BlockManager(blocks, block_size=16, watermark=0.0))


def land(s, plan: SchedulerOutput) -> None:
    """What the engine does when a batch comes back: advance its sequences, then release them."""
    for chunk in plan.chunks:
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if chunk.seq.num_uncomputed == 0:
            chunk.seq.output_token_ids.append(7)
    s.land(plan)


def names(plan: SchedulerOutput) -> set[str]:
    return {c.seq.request_id for c in plan.chunks}


@pytest.mark.parametrize("policy", POLICIES)
def test_no_sequence_is_in_two_batches_in_flight(policy):
    s = scheduler(policy)
    for i in range(6):
        s.add(seq(f"r{i}", 10 + 20 * i))
    in_flight: list[SchedulerOutput] = []
    landed = 0
    while s.has_work() and landed < 200:
        plan = s.schedule()
        if plan.chunks:
            busy = set().union(*(names(p) for p in in_flight))
            assert not names(plan) & busy
            s.launch(plan)
            in_flight.append(plan)
        if len(in_flight) == 2 or (in_flight and not plan.chunks):
            land(s, in_flight.pop(0))
            landed += 1
            for x in [x for x in s.running if len(x.output_token_ids) >= 3 and x not in s.in_flight]:
                s.finish(x)
    assert not s.has_work()


def test_sarathi_fills_the_second_micro_batch_with_other_sequences():
    s = scheduler("sarathi", budget=64)
    long, short = seq("long", 500), seq("short", 30)
    s.add(long)
    s.add(short)
    first = s.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in first.chunks] == [("long", 64)]
    s.launch(first)
    second = s.schedule()
    # The long prompt's next chunk waits for its first to land; the short prompt goes meanwhile.
    assert [(c.seq.request_id, c.num_tokens) for c in second.chunks] == [("short", 30)]
    s.launch(second)
    assert not s.schedule().chunks
    land(s, first)
    assert [(c.seq.request_id, c.num_tokens) for c in s.schedule().chunks] == [("long", 64)]


def test_running_out_of_blocks_never_preempts_a_sequence_in_flight():
    s = scheduler("sarathi", budget=512, blocks=3)
    old, young = seq("old", 16), seq("young", 16)
    s.add(old)
    s.add(young)
    land(s, s.schedule())  # both decoding, one block each, one block free
    for x, computed in ((old, 31), (young, 31)):
        x.output_token_ids.extend([7] * (computed - x.num_tokens + 1))
        x.num_computed_tokens = computed
    young_only = SchedulerOutput()
    young_only.add(young, 1)
    s.launch(young_only)
    # old needs a third block, young (in flight) a fourth: only old can be served, by the free block.
    assert [(c.seq.request_id, c.num_tokens) for c in s.schedule().chunks] == [("old", 1)]
    old.output_token_ids.extend([7] * 16)
    old.num_computed_tokens += 16
    # Now old needs yet another block; the youngest, young, is in flight, so old gives way itself.
    assert not s.schedule().chunks
    assert s.num_preemptions == 1 and s.waiting[0] is old and young in s.running
