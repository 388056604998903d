"""The policies' batching rules, checked on the scheduler alone (no model): each iteration's plan
is "executed" by advancing the sequences as the engine would."""
from __future__ import annotations

from sarathi_engine.config import SchedulerConfig
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.sampling_params import SamplingParams
from sarathi_engine.scheduler import SchedulerOutput, make_scheduler
from sarathi_engine.sequence import Sequence


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def run(plan: SchedulerOutput) -> None:
    """Advance every scheduled sequence as the engine does, sampling token 7 when a chunk completes it."""
    for chunk in plan.chunks:
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if chunk.seq.num_uncomputed == 0:
            chunk.seq.output_token_ids.append(7)


def scheduler(policy: str, budget: int = 64, blocks: int = 1000, max_num_seqs: int = 128):
    config = SchedulerConfig(policy=policy, token_budget=budget, max_num_seqs=max_num_seqs, max_model_len=4096)
    return make_scheduler(config, BlockManager(blocks, block_size=16, watermark=0.0))


def plan_of(plan: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_tokens) for c in plan.chunks]


def decoding(s, names: list[str], prompt_len: int = 8) -> list[Sequence]:
    seqs = [seq(n, prompt_len) for n in names]
    for x in seqs:
        s.add(x)
    run(s.schedule())
    assert all(x.is_decoding for x in seqs)
    return seqs


def test_sarathi_puts_decodes_first_then_chunks_a_long_prompt_within_the_budget():
    s = scheduler("sarathi", budget=64)
    decoding(s, ["a", "b", "c"])
    long = seq("long", 500)
    s.add(long)
    plans = []
    while not long.output_token_ids:
        plan = s.schedule()
        plans.append(plan_of(plan))
        run(plan)
    # Every iteration carries all three decodes (no stall) and fills the rest with the prompt.
    assert len(plans) == 9
    for p in plans:
        assert p[:3] == [("a", 1), ("b", 1), ("c", 1)]
    assert [p[3] for p in plans[:-1]] == [("long", 61)] * 8
    assert sum(n for p in plans for name, n in p if name == "long") == 500


def test_sarathi_admits_new_requests_first_come_first_served_in_the_leftover_budget():
    s = scheduler("sarathi", budget=32)
    for name, n in [("x", 20), ("y", 20), ("z", 5)]:
        s.add(seq(name, n))
    assert plan_of(s.schedule()) == [("x", 20), ("y", 12)]


def test_sarathi_respects_max_num_seqs():
    s = scheduler("sarathi", budget=512, max_num_seqs=2)
    for name in "abc":
        s.add(seq(name, 4))
    assert [name for name, _ in plan_of(s.schedule())] == ["a", "b"]


def test_a_budget_change_applies_to_the_next_schedule():
    s = scheduler("sarathi", budget=32)
    s.add(seq("long", 1000))
    assert plan_of(s.schedule()) == [("long", 32)]
    s.config.token_budget = 100
    assert s.schedule().num_tokens == 100


def test_vllm_runs_whole_prompts_alone_and_stalls_decodes():
    s = scheduler("vllm", budget=64)
    decoding(s, ["a", "b"])
    s.add(seq("long", 500))
    assert plan_of(s.schedule()) == [("long", 500)]  # prefill-only iteration, decodes wait


def test_orca_mixes_whole_prompts_with_decodes():
    s = scheduler("orca", budget=64)
    decoding(s, ["a", "b"])
    s.add(seq("long", 500))
    assert plan_of(s.schedule()) == [("a", 1), ("b", 1), ("long", 500)]


def test_fastertransformer_admits_nothing_while_a_batch_runs():
    s = scheduler("fastertransformer")
    decoding(s, ["a", "b"])
    s.add(seq("late", 10))
    plan = s.schedule()
    assert plan_of(plan) == [("a", 1), ("b", 1)]
    for x in list(s.running):
        s.finish(x)
    assert plan_of(s.schedule()) == [("late", 10)]


def test_running_out_of_blocks_preempts_the_youngest_and_recomputes_it_later():
    s = scheduler("sarathi", budget=512, blocks=3)  # 48 token slots
    old, young = decoding(s, ["old", "young"], prompt_len=16)  # one full block each, one left
    old.output_token_ids.extend([7] * 15)  # pretend both decoded up to their block's end
    old.num_computed_tokens = 31
    young.num_computed_tokens = 16
    plan = s.schedule()
    # old needs its 3rd block, young its 2nd: only one is free, so young (admitted last) goes.
    assert plan_of(plan) == [("old", 1)]
    assert s.num_preemptions == 1
    assert young.num_computed_tokens == 0 and young.block_table == [] and s.waiting[0] is young
    s.finish(old)
    assert s.blocks.num_free_blocks == 3
    assert plan_of(s.schedule()) == [("young", 17)]  # prompt and its output, prefilled again


def test_blocks_are_all_free_after_every_sequence_finishes_or_is_aborted():
    s = scheduler("sarathi", budget=40, blocks=50)
    seqs = [seq(f"r{i}", 10 + 7 * i) for i in range(8)]
    for x in seqs:
        s.add(x)
    run(s.schedule())
    for x in seqs:
        s.finish(x)
    assert s.blocks.num_free_blocks == 50
    assert not s.has_work()
