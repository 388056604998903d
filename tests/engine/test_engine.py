"""The engine under pressure and misuse: preemption with a small KV cache, a live token-budget
change, and bad requests that must fail alone."""
from __future__ import annotations

import random

import pytest

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.config import EngineConfig, SchedulerConfig
from sarathi_engine.engine import LLMEngine


def run_to_completion(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_64_mixed_requests_in_a_small_cache_preempt_and_still_match_running_alone(tiny_models):
    rng = random.Random(3)
    lengths = [1, 1500] + [rng.randint(1, 1500) for _ in range(62)]
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    folder = str(tiny_models["llama"])

    alone = LLM(folder, dtype="float32", token_budget=512, kv_cache_memory="64MiB")
    expected = [alone.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]

    # 8 KiB a block: 100 blocks hold 1600 tokens, one long prompt and a few short ones at a time.
    small = LLM(folder, dtype="float32", token_budget=256, kv_cache_memory=100 * 8192, max_model_len=1600)
    engine = small.engine
    assert engine.blocks.num_blocks == 100
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    finished = run_to_completion(engine)

    assert [finished[f"r{i}"].token_ids for i in range(len(prompts))] == expected
    assert engine.scheduler.num_preemptions > 0
    assert sum(out.num_preemptions for out in finished.values()) == engine.scheduler.num_preemptions
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_token_budget_change_takes_effect_on_the_next_iteration(tiny_models):
    engine = LLM(str(tiny_models["qwen2"]), dtype="float32", token_budget=64, max_token_budget=200,
                 kv_cache_memory="64MiB").engine
    for i in range(4):
        engine.add_request(f"long{i}", list(range(100, 700)), SamplingParams(max_tokens=4))
    for _ in range(3):
        engine.step()
    engine.set_token_budget(200)
    engine.step()
    engine.set_token_budget(32)
    engine.step()
    tokens = [it.num_tokens for it in engine.iterations]
    assert tokens == [64, 64, 64, 200, 32]
    assert [it.token_budget for it in engine.iterations] == tokens
    with pytest.raises(ValueError, match="token_budget must be a positive integer"):
        engine.set_token_budget(0)
    with pytest.raises(ValueError, match="token_budget 201 is above 200, the largest this engine warmed up for"):
        engine.set_token_budget(201)
    assert engine.token_budget == 32
    run_to_completion(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_aborting_requests_frees_their_blocks(tiny_models):
    engine = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=64, kv_cache_memory="64MiB").engine
    for i in range(6):
        engine.add_request(f"r{i}", list(range(5, 300)), SamplingParams(max_tokens=50))
    for _ in range(8):
        engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    for i in range(6):
        engine.abort_request(f"r{i}")
    outputs = engine.step()
    assert {o.request_id: o.finish_reason for o in outputs} == {f"r{i}": "abort" for i in range(6)}
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("prompt,params,message", [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    (list(range(3, 3 + 600)), {}, "prompt has 600 tokens; max_model_len is 512"),
    ([1, 2, 10**6], {}, "outside the vocabulary"),
    ("hello", {"max_tokens": 0}, "max_tokens must be at least 1"),
    ("hello", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ("hello", {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ("hello", {"temperature": -1}, "temperature must be >= 0"),
])
def test_bad_input_raises_a_clear_error_and_the_engine_keeps_serving(tiny_models, prompt, params, message):
    engine = LLM(str(tiny_models["mistral"]), dtype="float32", max_model_len=512, kv_cache_memory="64MiB").engine
    engine.add_request("good", "The quick brown fox", SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, SamplingParams(**params))
    finished = run_to_completion(engine)
    assert list(finished) == ["good"] and len(finished["good"].token_ids) == 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_unknown_model_path_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model '.*nowhere' not found"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nowhere")))


def test_impossible_settings_are_refused_at_start(tiny_models):
    with pytest.raises(ValueError, match="policy must be one of"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        LLM(str(tiny_models["llama"]), max_model_len=4096)
    with pytest.raises(ValueError, match="KV cache holds 160 tokens, fewer than max_model_len 1000"):
        LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=10 * 8192, max_model_len=1000)


def test_an_slo_no_iteration_can_meet_plans_minimum_chunks_counts_them_and_changes_no_output(tiny_models):
    folder = str(tiny_models["llama"])
    prompts = [[100 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((700, 40, 300))]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = [o.token_ids for o in LLM(folder, dtype="float32", token_budget=128).generate(prompts, params)]

    llm = LLM(folder, dtype="float32", token_budget=128, tbt_slo_ms=0.001, min_prefill_chunk=8)
    engine, planner = llm.engine, llm.engine.planner
    # Calibrated at start, its iterations out of the history: the fit drives the first request.
    assert planner.active and not engine.iterations and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected  # the chunking never changes a token
    assert all(v >= 0 for v in planner.model.coefficients().values())
    planned = list(engine.iterations)
    # Nothing fits a microsecond: an iteration with decodes holds at most the minimum chunk; one
    # without (no token gap to keep within the SLO) takes what the budget gives.
    with_decodes = [it for it in planned if it.num_decode_tokens]
    assert len(with_decodes) > 24 and all(it.num_prefill_tokens <= 8 for it in with_decodes)
    assert max(it.num_prefill_tokens for it in planned if not it.num_decode_tokens) == 128
    assert planner.infeasible > 0 and engine.iterations[-1].infeasible_iterations == planner.infeasible
    assert all(it.predicted is not None and it.predicted > 0 for it in planned)

    engine.set_tbt_slo_ms(None)  # live: the budget alone again
    engine.add_request("after", prompts[0][::-1], SamplingParams(max_tokens=1))  # nothing of it cached
    engine.step()
    assert engine.iterations[-1].num_prefill_tokens == 128
    run_to_completion(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    with pytest.raises(ValueError, match="tbt_slo_ms must be a number of milliseconds"):
        engine.set_tbt_slo_ms(-5)


def test_an_slo_is_refused_where_no_planner_can_run(tiny_models):
    with pytest.raises(ValueError, match="policy 'vllm' does not chunk"):
        SchedulerConfig(policy="vllm", tbt_slo_ms=100)
    with pytest.raises(ValueError, match="min_prefill_chunk must be a positive integer"):
        SchedulerConfig(min_prefill_chunk=0)
    engine = LLM(str(tiny_models["llama"]), dtype="float32", policy="orca").engine
    with pytest.raises(ValueError, match="needs the sarathi policy"):
        engine.set_tbt_slo_ms(100)
