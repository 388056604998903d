"""The request fields real clients send, through the official openai client (and vLLM's benchmark
client's exact request shape): penalties, logit_bias, min_p/min_tokens, logprobs and echo, n and
best_of, structured output, and the fields accepted and ignored."""
from __future__ import annotations

import json

import aiohttp
import asyncio
import jsonschema
import openai
import pytest
from serving import post

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea,"
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(smol_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def complete(client, **fields):
    fields = {"max_tokens": 12, "temperature": 0, **fields}
    return client.completions.create(model="smollm2", prompt=STORY, **fields)


def test_sampling_fields_reach_the_sampler(client, tokenizer):
    greedy = complete(client).choices[0].text
    neutral = complete(client, presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u", suffix=None,
                       extra_body={"repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0,
                                   "metadata": {"team": "a"}, "parallel_tool_calls": False}).choices[0].text
    assert neutral == greedy
    assert complete(client, max_tokens=3, logit_bias={"42": 100}).choices[0].text == tokenizer.decode([42] * 3)
    long = {"max_tokens": 48, "extra_body": {"ignore_eos": True}}
    plain = complete(client, **long).choices[0].text
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"extra_body": {"ignore_eos": True, "repetition_penalty": 1.8}}):
        assert complete(client, **{**long, **penalty}).choices[0].text != plain
    short = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=64, temperature=0)
    held = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=64, temperature=0,
                                          extra_body={"min_tokens": short.usage.completion_tokens + 5})
    assert held.usage.completion_tokens >= short.usage.completion_tokens + 5


def test_completion_logprobs_with_echo_streamed_or_not(client, tokenizer):
    full = complete(client, max_tokens=6, logprobs=3, echo=True).choices[0]
    prompt_ids = tokenizer.encode(STORY)
    lp = full.logprobs
    assert full.text.startswith(STORY)
    assert len(lp.tokens) == len(prompt_ids) + 6 and lp.tokens[0] == tokenizer.decode(prompt_ids[:1])
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing scores the first token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(3 <= len(top) <= 4 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs) if top)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # greedy: every output token is the most likely one
    for token, logprob, top in zip(lp.tokens[-6:], lp.token_logprobs[-6:], lp.top_logprobs[-6:]):
        assert logprob == max(top.values()) and top[token] == logprob
    chunks = list(complete(client, max_tokens=6, logprobs=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == lp.token_logprobs
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset
    echoed = list(complete(client, max_tokens=6, echo=True, stream=True))  # no logprobs
    assert "".join(c.choices[0].text for c in echoed) == full.text and echoed[1].choices[0].logprobs is None
    plain = complete(client, max_tokens=6, logprobs=0).choices[0]
    assert plain.logprobs.token_logprobs == lp.token_logprobs[-6:] and plain.logprobs.text_offset[0] == 0


def test_chat_logprobs_in_openai_shape(client):
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    # As in vLLM, the end-of-turn token that stopped the answer is scored too (and counted in usage).
    assert "".join(item.token for item in content) == answer.choices[0].message.content + "<|im_end|>"
    assert len(content) == answer.usage.completion_tokens
    for item in content:
        assert bytes(item.bytes).decode() == item.token and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == item.logprob  # greedy picks the most likely
    streamed = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    items = [i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in items] == [(i.token, i.logprob) for i in content]
    assert client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4).choices[0].logprobs is None


def test_n_gives_distinct_repeatable_choices_and_best_of_keeps_the_most_likely(client):
    fields = dict(max_tokens=10, temperature=1.0, seed=7)
    three = complete(client, n=3, logprobs=0, **fields)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert len(set(texts)) == 3 and texts == [c.text for c in complete(client, n=3, **fields).choices]
    assert three.usage.prompt_tokens == complete(client, max_tokens=1).usage.prompt_tokens  # the prompt counts once
    best = complete(client, n=1, best_of=3, **fields)

    def per_token(choice):
        return sum(choice.logprobs.token_logprobs) / len(choice.logprobs.token_logprobs)

    assert best.choices[0].text == max(three.choices, key=per_token).text
    assert best.usage.completion_tokens == three.usage.completion_tokens  # every sample is generated
    streamed = list(complete(client, n=2, stream=True, **fields))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == texts[i]
    chat = client.chat.completions.create(model="smollm2", messages=FRANCE, n=2, max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content != chat.choices[1].message.content


@pytest.mark.parametrize("response_format,schema", [
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}, CITY),
])
def test_structured_output_parses_and_validates(client, response_format, schema):
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris in JSON."}], max_tokens=100,
        temperature=0.7, seed=1, response_format=response_format)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_vllm_bench_serve_request_shape_is_served_with_usage(smol_server):
    """vllm bench serve --backend openai's payload (vllm/benchmarks/lib/endpoint_request_func.py)."""
    body = {"model": "smollm2", "prompt": STORY, "repetition_penalty": 1.0, "max_tokens": 20, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(smol_server.url + "/v1/completions", json=body) as response:
                assert response.status == 200
                return [json.loads(line[6:]) for line in (await response.text()).splitlines()
                        if line.startswith("data: {")]

    events = asyncio.run(run())
    assert sum(1 for e in events if e["choices"]) == 20
    assert events[-1]["usage"]["completion_tokens"] == 20 and events[-1]["usage"]["prompt_tokens"] > 5


BAD_FIELDS = [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 17}, "n"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to str.isdigit, not to int()
    ({"suffix": "and then"}, "suffix"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
]


@pytest.mark.parametrize("fields,param", BAD_FIELDS)
def test_out_of_range_fields_get_a_400_naming_the_field(smol_server, fields, param):
    code, error = post(smol_server.url + "/v1/completions", {"prompt": "hi", **fields})
    assert code == 400 and error["error"]["param"] == param, error
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]


def test_invalid_schema_and_chat_logprob_fields_are_named(smol_server):
    url = smol_server.url + "/v1/chat/completions"
    code, error = post(url, {"messages": FRANCE, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}})
    assert code == 400 and error["error"]["param"] == "response_format" and "objectx" in error["error"]["message"]
    code, error = post(url, {"messages": FRANCE, "top_logprobs": 3})
    assert code == 400 and error["error"]["param"] == "top_logprobs"
    code, error = post(url, {"messages": FRANCE, "logprobs": 2})
    assert code == 400 and error["error"]["param"] == "logprobs"
