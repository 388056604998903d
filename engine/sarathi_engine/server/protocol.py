"""OpenAI request bodies in, engine requests out; engine outputs in, OpenAI JSON out.

Pure functions only. Every rejection is a RequestError carrying the HTTP status and an
OpenAI-style error object.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from sarathi_engine.sampling_params import SamplingParams


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _token_ids(v):
    return isinstance(v, list) and all(_int(t) for t in v)


def _prompt(v):
    return (isinstance(v, str) or _token_ids(v)
            or (isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(_token_ids(p) for p in v))))


# name: (accepts the value, what it must be). None always means "the default".
SAMPLING_FIELDS = {
    "max_tokens": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number between 0 and 2"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _int(v) and v >= -1, "an integer >= -1 (-1 or 0 disables it)"),
    "seed": (lambda v: _int(v) and -(2**63) <= v < 2**64, "a 64-bit integer"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) and s for s in v)),
             "a string or a list of at most 16 non-empty strings"),
    "stop_token_ids": (lambda v: _token_ids(v) and all(t >= 0 for t in v), "a list of token ids"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict) and set(v) <= {"include_usage", "continuous_usage_stats"}
                       and all(isinstance(x, bool) for x in v.values()),
                       'an object like {"include_usage": true, "continuous_usage_stats": false}'),
    "n": (lambda v: v == 1, "1 (only one choice per prompt is supported)"),
    "best_of": (lambda v: v == 1, "1"),
    "echo": (lambda v: v is False, "false (echo is not supported)"),
    "logprobs": (lambda v: v is False or (_int(v) and v == 0), "null (logprobs are not supported)"),
    "top_logprobs": (lambda v: v == 0, "null (logprobs are not supported)"),
    "presence_penalty": (lambda v: _number(v) and v == 0, "0 (penalties are not supported)"),
    "frequency_penalty": (lambda v: _number(v) and v == 0, "0 (penalties are not supported)"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
}
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "prompt": (_prompt, "a string, a list of token ids, or a list of either")}
CHAT_FIELDS = {
    **SAMPLING_FIELDS,
    "messages": (lambda v: isinstance(v, list) and bool(v) and all(_message(m) for m in v),
                 'a non-empty list of {"role": ..., "content": ...} objects'),
    "max_completion_tokens": SAMPLING_FIELDS["max_tokens"],
}
ROLES = {"system", "user", "assistant", "developer", "tool"}


def _message(m) -> bool:
    if not isinstance(m, dict) or not set(m) <= {"role", "content", "name"}:
        return False
    if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        return False
    content = m.get("content")
    return isinstance(content, str) or (
        isinstance(content, list)
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    )


@dataclass
class GenerationRequest:
    prompts: list  # texts or token-id lists; for chat, one list of messages
    given: dict  # the validated body fields that were not null
    default_max_tokens: int | None  # None: as many as the context leaves

    @property
    def stream(self) -> bool:
        return self.given.get("stream", False)

    @property
    def include_usage(self) -> bool:
        return self.given.get("stream_options", {}).get("include_usage", False)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's extension: usage in every chunk, so clients can count tokens per event."""
        return self.given.get("stream_options", {}).get("continuous_usage_stats", False)

    @property
    def model(self) -> str | None:
        return self.given.get("model")

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Sampling for one prompt, max_tokens checked against (or, when left open, set to) the
        room the context leaves."""
        g = self.given
        room = max_model_len - prompt_len
        max_tokens = g.get("max_tokens", g.get("max_completion_tokens", self.default_max_tokens))
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion).",
                param="max_tokens")
        stop = g.get("stop", [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=g.get("temperature", 1.0),
            top_p=g.get("top_p", 1.0),
            top_k=max(0, g.get("top_k", 0)),
            seed=g.get("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=g.get("stop_token_ids", []),
            ignore_eos=g.get("ignore_eos", False),
        )


def check_fields(body: object, fields: dict, required: str) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    if body.get(required) is None:
        raise RequestError(f"'{required}' is required", param=required)
    given = {k: v for k, v in body.items() if v is not None}
    for name, value in given.items():
        accepts, expected = fields[name]
        if not accepts(value):
            raise RequestError(f"'{name}' must be {expected}, got {value!r:.80}", param=name)
    return given


def parse_completion(body: object) -> GenerationRequest:
    given = check_fields(body, COMPLETION_FIELDS, "prompt")
    prompt = given["prompt"]
    prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt) else list(prompt)
    return GenerationRequest(prompts, given, default_max_tokens=16)


def parse_chat(body: object) -> GenerationRequest:
    given = check_fields(body, CHAT_FIELDS, "messages")
    messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in given["messages"]]
    return GenerationRequest([messages], given, default_max_tokens=None)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


# --- responses ---------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chunk(request_id: str, model: str, index: int, text: str | None, finish_reason: str | None, chat: bool,
          role: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        body = {"index": index, "delta": delta, "finish_reason": finish_reason}
    else:
        body = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [body]}


def usage_chunk(request_id: str, model: str, usage_: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage_}
