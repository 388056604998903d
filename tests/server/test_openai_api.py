"""The official openai client against a real server: completions and chat, streaming and not."""
from __future__ import annotations

import openai
import pytest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smol_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_chat_answers_paris_streamed_or_not(client):
    full = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=32, temperature=0)
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens > 10 and full.usage.completion_tokens > 3
    stream = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_streamed_text_equals_non_streamed(client):
    prompt = "Once upon a time, in a small village by the sea,"
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len(chunks) == 40  # one event per token
    assert 0 <= chunks[0].model_extra["sarathi"]["scheduling_delay"] < 5
    assert all("sarathi" not in c.model_extra for c in chunks[1:])
    counted = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                             stream_options={"continuous_usage_stats": True}))
    assert [c.usage.completion_tokens for c in counted] == list(range(1, 41))
    assert {c.usage.prompt_tokens for c in counted} == {full.usage.prompt_tokens}


def test_token_id_prompts_batches_and_sampling_fields(client):
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    batch = client.completions.create(model="smollm2", prompt=[ids, ids[:3]], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 8 and batch.usage.completion_tokens == 10
    text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert text.choices[0].text == batch.choices[0].text
    stopped = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=10,
                                        temperature=0, stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model="smollm2", prompt="Tell me a story", max_tokens=12, temperature=1.0,
                                        top_p=0.9, seed=42).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
