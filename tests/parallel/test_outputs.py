"""Tensor and pipeline parallelism change where the work runs, never the greedy output: each
layout must produce exactly the single-process tokens, with chunked prefills under a small
budget so that batches mix prefill chunks and decodes."""
from __future__ import annotations

import random
from itertools import pairwise

import pytest

from sarathi_engine import LLM, SamplingParams

MAX_NEW = 12
BUDGET = 16
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (tensor, pipeline)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]


PROMPTS = random_prompts([1, 5, 40, 77, 130], seed=1)


def generate(folder, prompts, **layout) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), dtype="float32", token_budget=BUDGET, kv_cache_memory="64MiB", **layout)
    try:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    finally:
        llm.engine.shutdown()
    return [o.token_ids for o in outputs], llm


def overlapped(llm: LLM) -> bool:
    """Did a batch start before the previous one landed (two micro-batches in flight)?"""
    its = llm.engine.iterations
    return any(b.start < a.start + a.duration for a, b in pairwise(its))


@pytest.fixture(scope="module")
def single_process(tiny_models) -> dict[str, list[list[int]]]:
    return {kind: generate(tiny_models[kind], PROMPTS)[0] for kind in ("llama", "qwen2")}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_models_match_a_single_process(tiny_models, single_process, kind, tp, pp):
    tokens, llm = generate(tiny_models[kind], PROMPTS, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert tokens == single_process[kind]
    its = llm.engine.iterations
    assert any(it.num_prefill_tokens and it.num_decode_tokens for it in its)
    assert max(it.num_tokens for it in its) == BUDGET
    assert overlapped(llm) == (pp > 1)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    return [chat, *random_prompts([3, 60], seed=2)]


@pytest.fixture(scope="module")
def smollm2_single(smollm2_dir, smollm2_prompts) -> list[list[int]]:
    return generate(smollm2_dir, smollm2_prompts)[0]


def test_smollm2_at_tp2_splits_its_9_heads_6_and_3_and_matches_a_single_process(
        smollm2_dir, smollm2_prompts, smollm2_single):
    llm = LLM(str(smollm2_dir), dtype="float32", token_budget=BUDGET, kv_cache_memory="64MiB",
              tensor_parallel_size=2)
    try:
        attention = llm.engine.runner.model.layers[0].self_attn
        # Rank 0 holds two of the three KV groups (6 query heads); rank 1 the third.
        assert (attention.num_heads, attention.num_kv_heads) == (6, 2)
        outputs = llm.generate(smollm2_prompts, SamplingParams(max_tokens=MAX_NEW))
    finally:
        llm.engine.shutdown()
    assert [o.token_ids for o in outputs] == smollm2_single
    assert "Paris" in outputs[0].text


def test_smollm2_at_pp2_matches_a_single_process(smollm2_dir, smollm2_prompts, smollm2_single):
    tokens, llm = generate(smollm2_dir, smollm2_prompts, pipeline_parallel_size=2)
    assert tokens == smollm2_single
    assert len(llm.engine.runner.model.layers) == 15


def test_one_tensor_parallel_llm_after_another_in_the_same_process(tiny_models):
    prompts = random_prompts([5, 40], seed=4)
    runs = []
    for _ in range(2):
        with LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="16MiB", tensor_parallel_size=2) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8))])
    assert runs[0] == runs[1] and all(len(t) == 8 for t in runs[0])


@pytest.mark.parametrize("layout,message", [
    (dict(tensor_parallel_size=4), "9 attention heads with 3 KV heads cannot be split over tensor-parallel size 4"),
    (dict(pipeline_parallel_size=31), "pipeline-parallel size 31 is larger than the model's 30 layers"),
])
def test_impossible_layouts_fail_at_start_naming_the_numbers(smollm2_dir, layout, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(smollm2_dir), kv_cache_memory="64MiB", **layout)


def test_aborts_of_requests_in_flight_wait_for_their_batch_and_free_every_block(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=BUDGET, kv_cache_memory="64MiB",
              pipeline_parallel_size=2)
    engine = llm.engine
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50))
        while len(engine.scheduler.in_flight) < 2:
            engine.step()
        in_flight = {s.request_id for s in engine.scheduler.in_flight}
        for i in range(len(PROMPTS)):
            engine.abort_request(f"r{i}")
        reasons = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                reasons[out.request_id] = out.finish_reason
        assert set(reasons.values()) == {"abort"} and len(reasons) == len(PROMPTS)
        assert in_flight and not engine.scheduler.in_flight
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        engine.add_request("after", PROMPTS[1], SamplingParams(max_tokens=4))  # and it goes on serving
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()
