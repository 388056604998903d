"""Greedy outputs equal transformers' generate, whatever the policy or token budget."""
from __future__ import annotations

import random

import pytest
from reference_models import TINY_CONFIGS, hf_greedy

from sarathi_engine import LLM, SamplingParams, kernels

MAX_NEW = 24


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    story = tokenizer.encode("Once upon a time, in a small village by the sea, there lived an old fisherman who")
    return [chat, story, *random_prompts([1, 90, 200])]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir, smollm2_prompts) -> list[list[int]]:
    return hf_greedy(smollm2_dir, smollm2_prompts, MAX_NEW)


@pytest.mark.parametrize("policy,budget", [
    ("sarathi", 16), ("sarathi", 64), ("sarathi", 512), ("vllm", 512), ("orca", 512), ("fastertransformer", 512),
])
def test_smollm2_matches_transformers_under_every_policy_and_budget(
        smollm2_dir, smollm2_prompts, smollm2_reference, policy, budget):
    llm = LLM(str(smollm2_dir), dtype="float32", policy=policy, token_budget=budget, kv_cache_memory="256MiB",
              max_model_len=1024)  # the non-chunking policies warm up a whole max_model_len prompt
    outputs = llm.generate(smollm2_prompts, SamplingParams(max_tokens=MAX_NEW))
    assert [o.token_ids for o in outputs] == smollm2_reference
    if budget < 200:  # the 200-token prompt must really have been split into chunks
        assert max(it.num_tokens for it in llm.engine.iterations) == budget


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("budget", [16, 512])
@pytest.mark.parametrize("ops", ["cpu-kernels", "torch"])
def test_random_weight_models_match_transformers(tiny_models, kind, budget, ops, monkeypatch):
    if ops == "cpu-kernels" and kernels.load() is not None:
        pytest.skip(f"CPU kernels cannot run here: {kernels.load()}")
    monkeypatch.setenv("SARATHI_CPU_KERNELS", "1" if ops == "cpu-kernels" else "0")
    prompts = random_prompts([1, 5, 40, 77, 130], seed=1)
    reference = hf_greedy(tiny_models[kind], prompts, MAX_NEW)
    llm = LLM(str(tiny_models[kind]), dtype="float32", token_budget=budget, kv_cache_memory="64MiB")
    assert llm.engine.runner.ops.name == ops
    assert (llm.engine.runner.model.stack is not None) == (ops == "cpu-kernels")  # the layers in one call
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    assert [o.token_ids for o in outputs] == reference


def test_the_kernels_layer_by_layer_match_transformers(tiny_models, monkeypatch):
    """The kernels' per-layer calls, which run where a DecoderStack cannot (tensor parallelism,
    an o_proj bias, a head_dim the prefill kernel does not take)."""
    if kernels.load() is not None:
        pytest.skip(f"CPU kernels cannot run here: {kernels.load()}")
    from sarathi_engine.model.ops import CpuKernelOps

    monkeypatch.setattr(CpuKernelOps, "decoder_stack", lambda self, layers: None)
    prompts = random_prompts([1, 5, 40, 77, 130], seed=1)
    reference = hf_greedy(tiny_models["qwen2-window"], prompts, MAX_NEW)  # a qkv bias, a window from layer 1
    llm = LLM(str(tiny_models["qwen2-window"]), dtype="float32", token_budget=16, kv_cache_memory="64MiB")
    assert llm.engine.runner.ops.name == "cpu-kernels" and llm.engine.runner.model.stack is None
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    assert [o.token_ids for o in outputs] == reference


def test_smollm2_answers_paris(smollm2_dir):
    llm = LLM(str(smollm2_dir), kv_cache_memory="128MiB")
    out = llm.generate(llm.chat_prompt("What is the capital of France?"), SamplingParams(max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
