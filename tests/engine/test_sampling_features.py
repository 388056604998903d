"""Penalties, logit bias, min_p, min_tokens, logprobs and JSON output: each moves the output in its
documented direction, neutral values change nothing, and logprobs are transformers' own."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.sampler import filtered_probs, penalise
from sarathi_engine.sequence import Sequence

NEUTRAL = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, min_p=0.0, min_tokens=0,
               logit_bias={})


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    # A small budget so the prompts below are prefilled in several chunks.
    return LLM(str(smollm2_dir), dtype="float32", kv_cache_memory="256MiB", token_budget=16, seed=0)


@pytest.fixture(scope="module")
def france(llm) -> list[int]:
    return llm.chat_prompt("What is the capital of France?")


def distinct_share(tokens: list[int]) -> float:
    return len(set(tokens)) / len(tokens)


def test_neutral_values_and_logprobs_leave_greedy_output_unchanged(llm, france):
    plain = llm.generate(france, SamplingParams(max_tokens=24))[0]
    neutral = llm.generate(france, SamplingParams(max_tokens=24, logprobs=5, prompt_logprobs=3, **NEUTRAL))[0]
    assert neutral.token_ids == plain.token_ids and neutral.text == plain.text


def test_penalties_move_logits_of_seen_tokens_in_their_documented_direction():
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    prompt, output = [0], [1, 2, 2]
    assert penalise(row, prompt, output, 2.0, 0, 0).tolist() == [1.0, -4.0, 0.5, 0.5]  # seen: away from likely
    assert penalise(row, prompt, output, 0.5, 0, 0).tolist() == [4.0, -1.0, 2.0, 0.5]  # < 1 favours them
    # frequency per occurrence in the output, presence once; the prompt does not count for either
    assert penalise(row, prompt, output, 1.0, 0.5, 0).tolist() == [2.0, -2.5, 0.0, 0.5]
    assert penalise(row, prompt, output, 1.0, 0, 0.5).tolist() == [2.0, -2.5, 0.5, 0.5]
    assert penalise(row, prompt, output, 1.0, -1.0, 0).tolist() == [2.0, -1.0, 3.0, 0.5]


@pytest.mark.parametrize("penalty", [dict(frequency_penalty=1.5), dict(presence_penalty=1.5),
                                     dict(repetition_penalty=1.5)])
def test_penalties_make_a_long_greedy_output_repeat_less(llm, penalty):
    prompt = llm.tokenizer.encode("List the numbers one two three one two three one two three one two three")
    plain = llm.generate(prompt, SamplingParams(max_tokens=48, ignore_eos=True))[0].token_ids
    penalised = llm.generate(prompt, SamplingParams(max_tokens=48, ignore_eos=True, **penalty))[0].token_ids
    assert distinct_share(penalised) > distinct_share(plain) + 0.1


def test_logit_bias_forces_and_bans_tokens(llm, france):
    greedy = llm.generate(france, SamplingParams(max_tokens=4))[0].token_ids
    forced = llm.generate(france, SamplingParams(max_tokens=4, logit_bias={42: 100}))[0].token_ids
    assert forced == [42] * 4
    banned = llm.generate(france, SamplingParams(max_tokens=4, logit_bias={greedy[0]: -100}))[0].token_ids
    assert banned[0] != greedy[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.engine.check_params(SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101})


def test_min_p_keeps_tokens_at_least_that_share_of_the_most_likely():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # p = 0.64, 0.24, 0.09, 0.03
    kept = filtered_probs(logits, [SamplingParams(temperature=1.0, min_p=0.3)])
    assert (kept[0] > 0).tolist() == [True, True, False, False]
    assert torch.isclose(kept[0, 0] / kept[0, 1], torch.tensor(2.718281828))


def test_min_p_narrows_what_sampling_draws(llm, france):
    def distinct_first_tokens(min_p: float) -> int:
        params = [SamplingParams(max_tokens=1, temperature=1.5, seed=s, min_p=min_p) for s in range(40)]
        return len({o.token_ids[0] for o in llm.generate([france] * 40, params)})

    assert distinct_first_tokens(0.5) < distinct_first_tokens(0.0)


def test_min_tokens_holds_back_eos_and_stop_strings(llm, france):
    short = llm.generate(france, SamplingParams(max_tokens=64))[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    held = llm.generate(france, SamplingParams(max_tokens=64, min_tokens=20))[0]
    assert len(held.token_ids) >= 20 and not set(held.token_ids[:20]) & llm.engine.eos_token_ids
    stopped = llm.generate(france, SamplingParams(max_tokens=64, min_tokens=12, stop=["Paris"]))[0]
    assert len(stopped.token_ids) >= 12


def test_logprobs_match_transformers_for_prompt_and_output(llm, smollm2_dir):
    from transformers import AutoModelForCausalLM

    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs into the forest to")
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=5, prompt_logprobs=2))[0]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    tokens = prompt + out.token_ids
    assert len(out.prompt_logprobs) == len(prompt) - 1
    for position, entry in enumerate(out.prompt_logprobs):
        assert entry.token == tokens[position + 1]
        assert entry.logprob == pytest.approx(reference[position, entry.token].item(), abs=2e-3)
        assert [t for t, _ in entry.top] == reference[position].topk(2).indices.tolist()
    assert len(out.logprobs) == len(out.token_ids) == 6
    for i, entry in enumerate(out.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert entry.token == out.token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token].item(), abs=2e-3)
        values, ids = row.topk(5)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=2e-3)
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                           "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(llm, temperature):
    prompt = llm.chat_prompt("Describe Paris as JSON with its population.")
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=5, json_schema=SCHEMA)
    out = llm.generate(prompt, params)[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_an_invalid_schema_is_refused_with_the_problem_named(llm):
    with pytest.raises(ValueError, match="invalid JSON schema.*objectx"):
        llm.engine.check_params(SamplingParams(json_schema={"type": "objectx"}))


def test_sequences_start_with_no_grammar_and_no_logprobs():
    seq = Sequence("s", [1, 2], SamplingParams())
    assert seq.matcher is None and seq.logprobs == [] and seq.cumulative_logprob == 0
