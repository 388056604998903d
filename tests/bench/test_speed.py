"""`sarathi bench speed`: the protocol driving a real engine, the floors' arithmetic, and the
report. (The figures themselves live in docs/benchmarks.md, not in tests.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sarathi_engine import LLM
from sarathi_engine.bench import speed
from sarathi_engine.bench.speed_protocol import LOADED, QUIET, Beside, Span, conditions, run_cells, tree_cpu_seconds
from sarathi_engine.config import ModelConfig


def test_the_protocol_drives_our_engine_through_every_kind_of_cell(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=64, kv_cache_memory="64MiB")
    cells = [{"kind": "decode", "batch": 3, "context": 20, "steps": 4, "budget": 64},
             {"kind": "prefill", "prompts": 2, "prompt_len": 100, "budget": 64},
             {"kind": "mixed", "decodes": 4, "context": 10, "prompt_len": 150, "budget": 64}]
    results = run_cells(speed.OursAdapter(llm.engine), cells, repeats=2, progress=lambda _: None)
    assert [{k: v for k, v in r.items() if k not in ("figures", "cores")} for r in results] == cells
    assert all(len(r["figures"]) == 2 and min(r["figures"]) > 0 for r in results)
    # Every repeat kept some cores busy. (These repeats last milliseconds, too short to bound the
    # cores by the machine's: see Span; the test below bounds them over half a second.)
    cores = [r["cores"] for r in results]
    assert all(len(c) == 2 and min(c) > 0 for c in cores), cores
    # Every request was finished or aborted: the engine is idle and every block is free again.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    # The mixed iterations really held a chunk: some iteration had decodes and prefill together.
    assert any(it.num_prefill_tokens and it.num_decode_tokens for it in llm.engine.iterations)


def test_costs_of_smollm2(smollm2_dir):
    costs = speed.ModelCosts.of(ModelConfig.from_folder(smollm2_dir, "bfloat16"), 2)
    assert costs.weight_bytes == pytest.approx(269.0e6, rel=0.01)  # 134.5M parameters, LM head included
    assert costs.kv_bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert costs.flops_per_token == pytest.approx(2 * 106.2e6, rel=0.01)


def test_floors_are_the_slower_of_bandwidth_and_compute():
    costs = speed.ModelCosts(weight_bytes=1e9, flops_per_token=1e9, lm_head_flops=0.0, kv_bytes_per_token=0.0,
                             attention_flops_per_key=0.0)
    decode = {"kind": "decode", "batch": 1, "context": 10, "budget": 16}
    assert speed.floor_ms(decode, costs, bandwidth=1e10, gemm=1e12) == pytest.approx(100.0)  # memory bound
    big = {**decode, "batch": 1000}
    assert speed.floor_ms(big, costs, bandwidth=1e10, gemm=1e12) == pytest.approx(1000.0)  # compute bound
    prefill = {"kind": "prefill", "prompts": 1, "prompt_len": 512, "budget": 500}
    # 500 tokens x 1 GFLOP at 1 TFLOP/s = 0.5 s per iteration: 1000 tokens/s.
    assert speed.floor_figure(prefill, costs, bandwidth=1e12, gemm=1e12) == pytest.approx(1000.0)


def test_floors_come_from_the_best_reading_of_each_limit():
    start = {"bandwidth": 40e9, "gemm": {"torch": 400e9, "ours": 450e9}}
    end = {"bandwidth": 53e9, "gemm": {"torch": 800e9, "ours": 700e9}}
    assert speed.best_limits([start, end]) == {"bandwidth": 53e9, "gemm": {"torch": 800e9, "ours": 700e9}}
    costs = speed.ModelCosts(weight_bytes=1e9, flops_per_token=1e9, lm_head_flops=0.0, kv_bytes_per_token=0.0,
                             attention_flops_per_key=0.0)
    results = {"limit_readings": [start, end]}
    speed.with_floors(results, [{"kind": "decode", "batch": 1, "context": 10, "budget": 16}], costs)
    assert results["cells"][0]["floor"] == pytest.approx(1e9 / 53e9 * 1e3)  # ms at the higher bandwidth
    line = speed.limits_line(results)
    assert "read bandwidth 53.0 GB/s" in line and "the floors use 800" in line
    assert "40.0, 53.0 GB/s; 450, 800 GFLOP/s" in line


def test_ratios_say_how_many_times_faster_ours_is():
    decode, prefill = {"kind": "decode"}, {"kind": "prefill"}
    assert speed.speed_ratio(decode, ours=20.0, peer=40.0) == 2.0  # ms: less is faster
    assert speed.speed_ratio(prefill, ours=300.0, peer=100.0) == 3.0  # tokens/s: more is faster


def test_the_table_and_the_contention_table():
    cells = [{"kind": "decode", "batch": 1, "context": 256, "steps": 8, "budget": 512, "floor": 10.0},
             {"kind": "prefill", "prompts": 4, "prompt_len": 512, "budget": 128, "floor": 400.0}]
    quiet = {"cells": cells, "engines": [
        {"name": "ours", "results": [{"figures": [20.0, 21.0, 25.0]}, {"figures": [300.0, 310.0, 290.0]}]},
        {"name": "peer", "results": [{"figures": [40.0, 42.0, 44.0]}, {"figures": [100.0, 90.0, 95.0]}]}]}
    text = speed.table(quiet)
    assert "| decode step, batch 1, context 256 | ms | 21.0 (20.0-25.0) | 42.0 (40.0-44.0) | 2.00x | 10.0 | 2.10x |" in text
    assert "| prefill 4 x 512, chunk 128 | tokens/s | 300.0 (290.0-310.0) | 95.0 (90.0-100.0) | 3.16x | 400.0 | 1.33x |" in text
    # Each repeat's slowdown is its loaded span against its own quiet span, not medians against medians.
    paired = [
        {"name": "ours", "results": [
            {"figures": [20.0, 25.0, 30.0], "cores": [2.0, 1.9, 1.8],
             "loaded": {"figures": [24.0, 25.0, 45.0], "cores": [1.3, 1.25, 1.2]}},
            {"figures": [300.0, 310.0], "cores": [None, None],
             "loaded": {"figures": [150.0, 310.0], "cores": [1.0, 1.0]}}]},
        {"name": "peer", "results": [
            {"figures": [40.0, 40.0, 40.0], "loaded": {"figures": [120.0, 80.0, 100.0]}},
            {"figures": [100.0, 90.0], "loaded": {"figures": [20.0, 18.0]}}]}]
    text = speed.contention_table(cells, paired)
    assert "| decode step, batch 1, context 256 | 1.20x (1.00-1.50) | 1.90 -> 1.25 | 2.50x (2.00-3.00) | - |" in text
    assert "| prefill 4 x 512, chunk 128 | 1.50x (1.00-2.00) | - | 5.00x (5.00-5.00) | - |" in text


def test_contention_pairs_alternate_their_order():
    assert conditions(3, contention=False) == [QUIET] * 3
    assert conditions(3, contention=True) == [QUIET, LOADED, LOADED, QUIET, QUIET, LOADED]


def test_contention_measures_each_repeat_quiet_and_beside_a_busy_process(tiny_models, monkeypatch):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=64, kv_cache_memory="64MiB")
    cell = {"kind": "decode", "batch": 2, "context": 20, "steps": 40, "budget": 64}
    hogs = []
    enter = Beside.enter

    def recording(self, condition):
        switched = enter(self, condition)
        hogs.append(self.hog)
        return switched

    monkeypatch.setattr(Beside, "enter", recording)
    [result] = run_cells(speed.OursAdapter(llm.engine), [cell], repeats=2, progress=lambda _: None, contention=True)
    assert len(result["figures"]) == len(result["loaded"]["figures"]) == 2
    assert min(result["figures"] + result["loaded"]["figures"]) > 0
    # The loaded spans had a hog beside them and the quiet ones none; it is gone once the cell is done.
    assert [h is not None for h in hogs[:4]] == [False, True, True, False]
    assert all(h.poll() is not None for h in hogs if h is not None)
    # The hog's CPU time is not the engine's: beside it the engine on the tiny model kept about one
    # core busy (0.97-0.99 here), and with the hog counted a loaded span would read nearly two.
    assert all(c < 1.6 for c in result["loaded"]["cores"]), result["loaded"]["cores"]
    assert not llm.engine.has_unfinished_requests()


def test_cpu_time_of_a_process_tree_counts_its_children():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the child is running
        before, span = tree_cpu_seconds(), Span()
        time.sleep(0.5)  # this process sleeps: only the child can burn CPU meanwhile
        burnt = tree_cpu_seconds() - before
        _, cores = span.end()
        alone = tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert burnt > 0.05
    assert 0.1 < cores <= os.cpu_count() + 0.1
    assert alone is not None and alone > 0.05
    assert tree_cpu_seconds(2**22 + 1) is None  # no such process


def test_cpu_lists():
    assert speed.cpu_list("0-1") == [0, 1]
    assert speed.cpu_list("0,2-3") == [0, 2, 3]
