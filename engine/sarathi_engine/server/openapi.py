"""The OpenAPI document served at /openapi.json: what clients (and the API fuzzer) may send."""
from __future__ import annotations

from sarathi_engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from sarathi_engine.server.protocol import MAX_CHOICES


def token_ids(vocab_size: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}


SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "nullable": True},
    "top_k": {"type": "integer", "minimum": -1, "nullable": True},
    "seed": {"type": "integer", "nullable": True},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16}],
             "nullable": True},
    "ignore_eos": {"type": "boolean", "nullable": True},
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"},
                                                                   "continuous_usage_stats": {"type": "boolean"}},
                       "additionalProperties": False, "nullable": True},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "nullable": True},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
    "min_tokens": {"type": "integer", "minimum": 0, "nullable": True},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True},
    "logit_bias": {"type": "object", "description": "token id (a decimal string) -> bias added to its logit",
                   "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS},
                   "nullable": True},
    "response_format": {"oneOf": [
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False, "properties": {
            "type": {"type": "string", "enum": ["json_schema"]},
            "json_schema": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean", "nullable": True}}}}},
    ], "nullable": True},
    "user": {"type": "string", "nullable": True},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True},
    "parallel_tool_calls": {"type": "boolean", "nullable": True},
}
ERROR = {"description": "an OpenAI-style error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"]}}}}}}
GENERATION_RESPONSES = {
    "200": {"description": "a completion, or a text/event-stream of chunks when stream is true"},
    **{str(code): ERROR for code in (400, 404, 413, 429, 503)},
}


def openapi_document(model_name: str, vocab_size: int) -> dict:
    ids = token_ids(vocab_size)
    sampling = {**SAMPLING, "stop_token_ids": {**ids, "nullable": True}}
    completion = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        **sampling,
        "prompt": {"oneOf": [{"type": "string"}, ids, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             {"type": "array", "items": ids, "minItems": 1}]},
        "echo": {"type": "boolean", "nullable": True},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True},
        "best_of": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "nullable": True},
        "suffix": {"type": "string", "nullable": True, "description": "only null: no fill-in-the-middle mode"},
    }}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}
    chat = {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": {
        **sampling,
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "messages": {"type": "array", "items": message, "minItems": 1},
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True},
    }}

    def post(schema: dict, summary: str) -> dict:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                         "responses": GENERATION_RESPONSES}}

    def get(summary: str, codes=("200",)) -> dict:
        return {"get": {"summary": summary, "responses": {c: {"description": summary} for c in codes}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "Sarathi engine", "version": "1", "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": {
            "/v1/completions": post(completion, "Complete a prompt"),
            "/v1/chat/completions": post(chat, "Answer a chat"),
            "/v1/models": get("The served model"),
            "/health": get("The process is alive"),
            "/ready": get("The model is loaded and the engine is stepping", ("200", "503")),
            "/metrics": get("Prometheus metrics"),
        },
    }
