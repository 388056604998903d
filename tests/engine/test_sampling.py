"""Per-request sampling and stopping, on the real SmolLM2 model."""
from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.sampler import filtered_probs


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    # float32: bfloat16 logits shift with the batch's shape, enough to change a sampled token.
    return LLM(str(smollm2_dir), dtype="float32", kv_cache_memory="256MiB", seed=0)


@pytest.fixture(scope="module")
def france(llm) -> list[int]:
    return llm.chat_prompt("What is the capital of France?")


def test_greedy_text_is_the_decoded_tokens(llm, france):
    out = llm.generate(france, SamplingParams(max_tokens=40))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_seeded_sampling_repeats_and_ignores_its_batch_neighbours(llm, france):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(france, params)[0].token_ids
    others = SamplingParams(max_tokens=24, temperature=1.3, ignore_eos=True)
    batched = llm.generate([france, france, france], [others, params, others])
    assert batched[1].token_ids == alone
    other_seed = llm.generate(france, SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm, france):
    greedy = llm.generate(france, SamplingParams(max_tokens=16))[0].token_ids
    for params in (dict(top_k=1), dict(top_p=1e-6)):
        out = llm.generate(france, SamplingParams(max_tokens=16, temperature=1.5, seed=7, **params))[0]
        assert out.token_ids == greedy


def test_filtered_probabilities_follow_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = filtered_probs(logits, [SamplingParams(temperature=1.0)])
    assert torch.allclose(probs, logits.softmax(-1))
    top2 = filtered_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert top2[0, 2:].sum() == 0 and torch.isclose(top2[0, 0] / top2[0, 1], torch.tensor(2.718281828))
    # p(0)=0.64, p(1)=0.24: top_p 0.7 keeps the first two only.
    nucleus = filtered_probs(logits, [SamplingParams(temperature=1.0, top_p=0.7)])
    assert (nucleus[0] > 0).tolist() == [True, True, False, False]


def test_sampling_frequencies_match_the_distribution():
    from sarathi_engine.sampler import sample
    from sarathi_engine.sequence import Sequence

    logits = torch.tensor([[1.0, 0.0, -1.0]])
    seqs = [Sequence("s", [1], SamplingParams(temperature=1.0))]
    generator = torch.Generator().manual_seed(0)
    counts = collections.Counter(sample(logits, seqs, generator)[0].token for _ in range(4000))
    expected = logits.softmax(-1)[0].tolist()
    for token, p in enumerate(expected):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_stop_strings_cut_the_text_and_stop_token_ids_end_it(llm, france):
    out = llm.generate(france, SamplingParams(max_tokens=40, stop=["Paris"]))[0]
    assert out.finish_reason == "stop" and out.text == "The capital of France is "
    greedy = llm.generate(france, SamplingParams(max_tokens=40))[0].token_ids
    out = llm.generate(france, SamplingParams(max_tokens=40, stop_token_ids=[greedy[2]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[:3]


def test_max_tokens_and_ignore_eos(llm, france):
    out = llm.generate(france, SamplingParams(max_tokens=3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    out = llm.generate(france, SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert len(out.token_ids) == 30 and out.finish_reason == "length"


def test_the_cli_answers_the_demo_question(smollm2_dir):
    result = subprocess.run(
        [sys.executable, "-m", "sarathi_engine.cli", "generate", "--chat", "--max-tokens", "32",
         "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_draws_follow_the_filtered_distribution_and_never_pick_a_dropped_token():
    from sarathi_engine.sampler import sample
    from sarathi_engine.sequence import Sequence

    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, 5.0]])
    seqs = [Sequence("s", [1], SamplingParams(temperature=2.0, top_k=3, seed=11))]
    counts = collections.Counter(sample(logits, seqs, torch.Generator())[0].token for _ in range(4000))
    assert set(counts) <= {1, 3, 4}
    expected = filtered_probs(logits, [seqs[0].params])[0]
    for token in (1, 3, 4):
        assert abs(counts[token] / 4000 - expected[token].item()) < 0.03
