"""The benchmark harness's arithmetic: the two-phase load, per-phase summaries, the verdict and
the generated doc section (the runs themselves are in docs/autotune-runs.md)."""

import numpy as np
import pytest

from sarathi_engine.bench.records import RequestRecord
from benchmarks import autotune as benchmark

PHASES = [benchmark.Phase("chat", "sharegpt4", 0.25, 100), benchmark.Phase("summarisation", "arxiv_summarization",
                                                                           0.25, 50)]


def test_rates_give_each_phase_its_share_of_the_prefill_rate():
    long = [benchmark.Phase(p.name, p.workload, p.utilisation, 4000) for p in PHASES]
    rates = benchmark.request_rates(long, 0.125, 1024, 0, tokens_per_second=400)
    assert rates["summarisation"] < rates["chat"] / 2  # longer prompts
    load, labels = benchmark.build_load(long, rates, 0.125, 1024, 0)
    for ph in rates:
        tokens = sum(len(p) + m for p, m, lab in zip(load.prompts, load.max_tokens, labels) if lab == ph)
        assert tokens / 4000 == pytest.approx(0.25 * 400, rel=0.15)


def test_a_phase_may_scale_its_own_lengths():
    assert benchmark.phase("sharegpt4:0.5:60", "chat") == benchmark.Phase("chat", "sharegpt4", 0.5, 60)
    long = benchmark.phase("arxiv_summarization:0.25:4000:0.5", "summarisation")
    assert long.scale == 0.5
    short = benchmark.Phase("summarisation", "arxiv_summarization", 0.25, 4000)
    lengths = {}
    for ph in (short, long):
        load, _ = benchmark.build_load([ph], {"summarisation": 0.05}, 0.125, 4096, 0)
        lengths[ph.scale] = sorted(map(len, load.prompts))[len(load.prompts) // 2]
    assert lengths[0.5] > 3 * lengths[None]  # median prompt, clipped to the context


def test_the_load_sends_one_phase_after_the_other():
    load, labels = benchmark.build_load(PHASES, {"chat": 0.5, "summarisation": 0.2}, 0.125, 1024, 0)
    chat = [t for t, lab in zip(load.send_times, labels) if lab == "chat"]
    summ = [t for t, lab in zip(load.send_times, labels) if lab == "summarisation"]
    assert (len(chat), len(summ)) == (50, 10)
    assert max(chat) < 100 <= min(summ) < 150
    assert labels == sorted(labels)  # chat first
    assert max(map(len, load.prompts)) <= 1023


def record(send, token_times, prompt_len=100):
    return RequestRecord(0, prompt_len, len(token_times), send, token_times=token_times, end=token_times[-1])


def test_a_phase_summary_counts_gaps_within_the_slo_and_tokens_per_second():
    records = [record(0.0, [1.0, 1.1, 1.2, 1.5]), record(1.0, [0.5, 0.6, 1.0])]  # gaps .1 .1 .3 .1 .4
    s = benchmark.phase_summary(records, slo=0.25)
    assert s["attainment"] == pytest.approx(3 / 5)
    assert s["throughput"] == pytest.approx((200 + 7) / 2.0)  # first send 0, last response at 1 + 1.0
    assert s["ttft_p50"] == pytest.approx(0.75) and s["failed"] == 0


def test_p99_after_the_switch_takes_the_gaps_that_overlap_its_first_30_s():
    # Gaps 99.0-99.5 (before), 99.5-100.5 and 100.5-101.0 (inside), 101.0-131.0 (a stall that starts
    # inside and ends after), 131.0-131.5 (after): 0.5, 1.0, 0.5, 30.0, 0.5.
    records = [record(99.0, [0.0, 0.5, 1.5, 2.0, 32.0, 32.5])]
    assert benchmark.after_switch_p99(records, switch=100.0) == pytest.approx(np.percentile([1.0, 0.5, 30.0], 99))
    assert benchmark.after_switch_p99(records, switch=500.0) is None  # nothing decoding then


def test_no_request_decoding_after_the_switch_leaves_nothing_to_miss():
    assert verdict(*STATICS, target("loop", "loop", 512, (0.991, 98, 1.1), (0.993, 79, 8.0), None))["planned"]["loop"]["goal"]


def target(name, kind, budget, chat, summ, after_switch=0.1):
    def phase(attainment, throughput, ttft):
        return {"attainment": attainment, "throughput": throughput, "ttft_p50": ttft}
    return {"name": name, "kind": kind, "budget": budget, "after_switch_tbt_p99": after_switch,
            "phases": {"chat": phase(*chat), "summarisation": phase(*summ)}}


def verdict(*targets):
    return benchmark.verdict({"slo_ms": 250, "phases": {"chat": {}, "summarisation": {}}, "targets": list(targets)})


STATICS = [target("static 128", "static", 128, (1.0, 90, 2.0), (0.995, 80, 9.0)),
           target("static 512", "static", 512, (0.992, 100, 1.0), (0.9, 95, 5.0))]


def test_the_verdict_compares_each_planned_target_with_the_best_static_budget_that_holds_the_slo():
    v = verdict(*STATICS, target("planner", "planner", 512, (0.991, 94, 1.1), (0.993, 79, 8.0)),
                target("loop", "loop", 512, (0.991, 98, 1.1), (0.993, 79, 8.0)))
    assert v["phases"]["chat"]["best_static"] == 512 and v["phases"]["summarisation"]["best_static"] == 128
    loop = v["planned"]["loop"]
    assert loop["phases"]["chat"]["vs_best"] == pytest.approx(0.98)
    assert loop["phases"]["summarisation"]["ttft_vs_best"] == pytest.approx(8 / 9)
    assert loop["goal"]  # 98 against 100 and 79 against 80 are within 5%
    assert not v["planned"]["planner"]["goal"]  # 94 against 100 is not


@pytest.mark.parametrize("chat,summ,after_switch", [
    ((0.98, 100, 1.0), (0.993, 80, 9.0), 0.1),  # misses the SLO in chat
    ((0.991, 100, 1.0), (0.993, 75, 9.0), 0.1),  # 6% short in summarisation
    ((0.991, 100, 1.0), (0.993, 80, 9.0), 0.3),  # over the SLO just after the switch
])
def test_the_goal_needs_the_slo_and_the_throughput_in_each_phase_and_just_after_the_switch(chat, summ, after_switch):
    assert not verdict(*STATICS, target("loop", "loop", 512, chat, summ, after_switch))["planned"]["loop"]["goal"]


def test_where_no_static_budget_holds_the_slo_holding_it_is_enough():
    v = verdict(target("static 128", "static", 128, (1.0, 90, 2.0), (0.987, 80, 9.0)),
                target("loop", "loop", 128, (0.995, 92, 1.0), (0.991, 70, 9.5)))
    assert v["phases"]["summarisation"]["best_static"] is None and v["planned"]["loop"]["goal"]
