"""OpenAI request bodies in, engine requests out; engine outputs in, OpenAI JSON out.

Pure functions only. Every rejection is a RequestError carrying the HTTP status and an
OpenAI-style error object.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from sarathi_engine.grammar import ANY_JSON_OBJECT
from sarathi_engine.sampler import TokenLogprobs
from sarathi_engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams


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


def _logit_bias(v):
    return isinstance(v, dict) and len(v) <= MAX_LOGIT_BIAS_ENTRIES and all(
        isinstance(k, str) and k.isascii() and k.isdigit() and _number(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
        for k, b in v.items())


def _response_format(v):
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        return False
    if v["type"] != "json_schema":
        return set(v) == {"type"}
    spec = v.get("json_schema")
    return (set(v) == {"type", "json_schema"} and isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and set(spec) <= {"name", "description", "schema", "strict"}
            and isinstance(spec.get("schema", {}), dict) and isinstance(spec.get("strict", False), (bool, type(None))))


MAX_CHOICES = 16  # n and best_of: each choice is an engine request of its own
MAX_LOGIT_BIAS_ENTRIES = 1024

# name: (accepts the value, what it must be). None always means "the default".
SAMPLING_FIELDS = {
    "max_tokens": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number between 0 and 2"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _int(v) and v >= -1, "an integer >= -1 (-1 or 0 disables it)"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (lambda v: _int(v) and -(2**63) <= v < 2**64, "a 64-bit integer"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) and s for s in v)),
             "a string or a list of at most 16 non-empty strings"),
    "stop_token_ids": (lambda v: _token_ids(v) and all(t >= 0 for t in v), "a list of token ids"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "min_tokens": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "presence_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "repetition_penalty": (lambda v: _number(v) and 0 < v <= 2**31, "a number > 0"),
    "logit_bias": (_logit_bias, f"an object mapping token ids (as strings) to numbers in [-{MAX_LOGIT_BIAS:g}, "
                                f"{MAX_LOGIT_BIAS:g}], at most {MAX_LOGIT_BIAS_ENTRIES} of them"),
    "n": (lambda v: _int(v) and 1 <= v <= MAX_CHOICES, f"an integer in [1, {MAX_CHOICES}]"),
    "response_format": (_response_format, '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                                          '"json_schema": {"name": ..., "schema": {...}}}'),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict) and set(v) <= {"include_usage", "continuous_usage_stats"}
                       and all(isinstance(x, bool) for x in v.values()),
                       'an object like {"include_usage": true, "continuous_usage_stats": false}'),
    # Accepted and ignored: they change nothing a single model server does.
    "user": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                 "an object of strings"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "a boolean"),
    "model": (lambda v: isinstance(v, str), "a string"),
}
COMPLETION_FIELDS = {
    **SAMPLING_FIELDS,
    "prompt": (_prompt, "a string, a list of token ids, or a list of either"),
    "echo": (lambda v: isinstance(v, bool), "a boolean"),
    "logprobs": (lambda v: _int(v) and 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]"),
    "best_of": (lambda v: _int(v) and 1 <= v <= MAX_CHOICES, f"an integer in [1, {MAX_CHOICES}]"),
    "suffix": (lambda v: False, "null (suffix is not supported: the served models have no fill-in-the-middle mode)"),
}
CHAT_FIELDS = {
    **SAMPLING_FIELDS,
    "messages": (lambda v: isinstance(v, list) and bool(v) and all(_message(m) for m in v),
                 'a non-empty list of {"role": ..., "content": ...} objects'),
    "max_completion_tokens": SAMPLING_FIELDS["max_tokens"],
    "logprobs": (lambda v: isinstance(v, bool), "a boolean"),
    "top_logprobs": (lambda v: _int(v) and 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]"),
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
    chat: bool

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

    @property
    def n(self) -> int:
        return self.given.get("n", 1)

    @property
    def samples_per_prompt(self) -> int:
        """best_of samples are drawn for each prompt and the n most likely per token returned."""
        return self.given.get("best_of", self.n)

    @property
    def echo(self) -> bool:
        return self.given.get("echo", False)

    @property
    def top_logprobs(self) -> int | None:
        """Alternatives per token when the client asked for logprobs, else None."""
        if self.chat:
            return self.given.get("top_logprobs", 0) if self.given.get("logprobs", False) else None
        return self.given.get("logprobs")

    @property
    def json_schema(self) -> dict | None:
        """The schema the output must match, for response_format json_object or json_schema."""
        fmt = self.given.get("response_format", {"type": "text"})
        if fmt["type"] == "json_object":
            return ANY_JSON_OBJECT
        if fmt["type"] == "json_schema":
            return fmt["json_schema"].get("schema", ANY_JSON_OBJECT)
        return None

    def sampling_params(self, prompt_len: int, max_model_len: int, sample: int = 0) -> SamplingParams:
        """Sampling for one sample of one prompt, max_tokens checked against (or, when left
        open, set to) the room the context leaves. A seeded request's samples draw from seed,
        seed + 1, ... so that they differ and repeat."""
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
        if g.get("min_tokens", 0) > max_tokens:
            raise RequestError(f"'min_tokens' ({g['min_tokens']}) must not exceed max_tokens ({max_tokens})",
                               param="min_tokens")
        stop = g.get("stop", [])
        k = self.top_logprobs
        ranked = self.samples_per_prompt > self.n  # best_of ranks samples by their logprobs
        seed = g.get("seed")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=g.get("temperature", 1.0),
            top_p=g.get("top_p", 1.0),
            top_k=max(0, g.get("top_k", 0)),
            min_p=g.get("min_p", 0.0),
            seed=None if seed is None else (seed + sample) % 2**64,
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=g.get("stop_token_ids", []),
            ignore_eos=g.get("ignore_eos", False),
            min_tokens=g.get("min_tokens", 0),
            presence_penalty=g.get("presence_penalty", 0.0),
            frequency_penalty=g.get("frequency_penalty", 0.0),
            repetition_penalty=g.get("repetition_penalty", 1.0),
            logit_bias={int(t): float(b) for t, b in g.get("logit_bias", {}).items()},
            logprobs=k if k is not None else (0 if ranked else None),
            prompt_logprobs=k if self.echo and k is not None else None,
            json_schema=self.json_schema,
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
    best_of = given.get("best_of", given.get("n", 1))
    if best_of < given.get("n", 1):
        raise RequestError(f"'best_of' ({best_of}) must be at least n ({given['n']})", param="best_of")
    if best_of > given.get("n", 1) and given.get("stream", False):
        raise RequestError("'best_of' greater than n cannot be streamed: the best are known only at the end",
                           param="best_of")
    prompt = given["prompt"]
    prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt) else list(prompt)
    return GenerationRequest(prompts, given, default_max_tokens=16, chat=False)


def parse_chat(body: object) -> GenerationRequest:
    given = check_fields(body, CHAT_FIELDS, "messages")
    if "top_logprobs" in given and not given.get("logprobs", False):
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in given["messages"]]
    return GenerationRequest([messages], given, default_max_tokens=None, chat=True)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


# --- responses ---------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def choice(index: int, text: str, finish_reason: str | None, chat: bool, logprobs: dict | None = None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chunk(request_id: str, model: str, index: int, text: str | None, finish_reason: str | None, chat: bool,
          role: bool = False, logprobs: dict | None = None) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        body = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [body]}


def usage_chunk(request_id: str, model: str, usage_: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage_}


# --- logprobs ----------------------------------------------------------------------------------
# An entry of None stands for the first prompt token, which nothing before it scores.

def completion_logprobs(entries: list[TokenLogprobs | None], first_token: int | None, token_text,
                        offset: int = 0) -> dict:
    """Completions' shape: tokens, token_logprobs, top_logprobs and text_offset (from `offset`).
    As in vLLM, each top_logprobs dict holds the chosen token too."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        token = first_token if entry is None else entry.token
        text = token_text(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(entry.logprob)
            alternatives = {token_text(t): value for t, value in entry.top}
            alternatives.setdefault(text, entry.logprob)
            top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprobs], token_text) -> dict:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}

