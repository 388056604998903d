"""The aiohttp application: OpenAI routes, probes, /metrics and the admin API.

Handlers turn bodies into engine requests through `protocol` and stream what `AsyncEngine`
yields. Every failure leaves as an OpenAI-style JSON error; nothing a client sends can take the
server down.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sarathi_engine.config import check_slo_margin, check_tbt_slo_ms, check_token_budget
from sarathi_engine.server import protocol
from sarathi_engine.server.async_engine import AsyncEngine, EngineDead, Overloaded
from sarathi_engine.server.openapi import openapi_document
from sarathi_engine.sampling_params import InvalidParam, SamplingParams
from sarathi_engine.server.protocol import GenerationRequest, RequestError

log = logging.getLogger("sarathi.server")


@dataclass
class ServerState:
    engine: AsyncEngine | None  # None while the model loads
    served_model_name: str
    max_model_len: int
    admin_token: str | None
    api_key: str | None = None  # when set, /v1/* needs it as a Bearer token
    draining: bool = False
    stall_timeout: float | None = None  # /health fails once the engine has had work and no step this long


STATE = web.AppKey("state", ServerState)


def json_error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response(protocol.error_body(message, kind, param), status=status)


ERROR_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


@web.middleware
async def api_key_required(request: web.Request, handler):
    """/v1/* answers only with the API key, when one is set; probes and /metrics stay open."""
    key = request.app[STATE].api_key
    if key and request.path.startswith("/v1/") and not bearer_matches(request, key):
        return json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
    return await handler(request)


def bearer_matches(request: web.Request, secret: str) -> bool:
    """The request's Bearer token is `secret`, compared in constant time."""
    return hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {secret}".encode())


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_error(e.status, e.reason if e.status != 413 else f"request body too large: {e.text}",
                          ERROR_KINDS.get(e.status, "invalid_request_error"))
    except Overloaded as e:
        return json_error(429, str(e), "rate_limit_error")
    except EngineDead as e:
        return json_error(503, str(e), "service_unavailable")
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return json_error(500, "internal error; the server logged the details", "internal_error")


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def loaded(state: ServerState) -> AsyncEngine:
    if state.engine is None:
        raise RequestError("the model is still loading", status=503, kind="service_unavailable")
    return state.engine


def check_serving(state: ServerState, request: GenerationRequest) -> None:
    loaded(state)
    if state.draining:
        raise RequestError("the server is shutting down", status=503, kind="service_unavailable")
    if request.model is not None and request.model != state.served_model_name:
        raise RequestError(f"The model `{request.model}` does not exist.", status=404, param="model",
                           kind="not_found_error")


@dataclass
class Prepared:
    """One HTTP request as engine requests: its prompts' token ids, and samples_per_prompt
    (ids, sampling params) per prompt, prompt by prompt."""

    prompts: list[list[int]]
    samples: list[tuple[list[int], SamplingParams]]


def prepare(state: ServerState, request: GenerationRequest, tokenize) -> Prepared:
    """Every prompt tokenized and every sample's params checked, or the first RequestError."""
    prompts, samples = [], []
    for prompt in request.prompts:
        try:
            ids = tokenize(prompt)
        except ValueError as e:
            raise RequestError(str(e), param="messages" if request.chat else "prompt") from None
        prompts.append(ids)
        for sample in range(request.samples_per_prompt):
            try:
                params = request.sampling_params(len(ids), state.max_model_len, sample)
            except InvalidParam as e:
                raise RequestError(str(e), param=e.param) from None
            samples.append((ids, params))
    try:  # logit bias and schema are the same for every sample
        loaded(state).engine.check_params(samples[0][1])
    except InvalidParam as e:
        raise RequestError(str(e), param="response_format" if e.param == "json_schema" else e.param) from None
    return Prepared(prompts, samples)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    parsed = protocol.parse_completion(await read_json(request))
    check_serving(state, parsed)
    return await generate(request, state, parsed, state.engine.engine.tokenize, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    parsed = protocol.parse_chat(await read_json(request))
    check_serving(state, parsed)
    tokenizer = state.engine.engine.tokenizer

    def tokenize(messages):
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:  # templates reject some role orders with their own exceptions
            raise ValueError(f"the chat template rejected these messages: {e}") from None
        return state.engine.engine.tokenize(list(ids))

    return await generate(request, state, parsed, tokenize, chat=True)


async def generate(request: web.Request, state: ServerState, parsed: GenerationRequest, tokenize, chat: bool):
    prepared = prepare(state, parsed, tokenize)
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    submission = state.engine.submit(prepared.samples, request_id)
    view = ChoiceView(parsed, prepared, state.engine.engine.tokenizer)
    try:
        if parsed.stream:
            return await stream_response(request, request_id, state.served_model_name, submission, view)
        finals = {}
        async for index, out in submission.outputs():
            if out.finished:
                finals[index] = out
    finally:
        submission.abort()  # a no-op once everything finished; otherwise the client left
    choices = [view.choice(index, sample, finals[sample]) for index, sample in view.best(finals)]
    completion_tokens = sum(len(out.token_ids) for out in finals.values())
    return web.json_response(protocol.completion_response(
        request_id, state.served_model_name, choices, protocol.usage(view.prompt_tokens, completion_tokens), chat))


class ChoiceView:
    """How one request's engine outputs become OpenAI choices: which samples are returned under
    which index (best_of), echo, and logprobs in the endpoint's shape."""

    def __init__(self, parsed: GenerationRequest, prepared: Prepared, tokenizer) -> None:
        self.parsed, self.prepared = parsed, prepared
        self.per_prompt = parsed.samples_per_prompt
        self.prompt_tokens = sum(len(ids) for ids in prepared.prompts)
        self._tokenizer = tokenizer
        self._offsets: dict[int, int] = {}  # streaming: each choice's text_offset so far
        self._streaming: set[int] = set()  # samples whose first chunk has gone

    def token_text(self, token: int) -> str:
        return self._tokenizer.decode([token])

    def prompt_of(self, sample: int) -> list[int]:
        return self.prepared.prompts[sample // self.per_prompt]

    def best(self, finals: dict) -> list[tuple[int, int]]:
        """(choice index, sample) of the returned samples: every sample, or with best_of the n
        most likely per token of each prompt."""
        n, chosen = self.parsed.n, []
        for p in range(len(self.prepared.prompts)):
            samples = range(p * self.per_prompt, (p + 1) * self.per_prompt)
            if self.per_prompt > n:
                samples = sorted(samples, key=lambda s: mean_logprob(finals[s]), reverse=True)[:n]
            chosen.extend((p * n + rank, sample) for rank, sample in enumerate(samples))
        return chosen

    def choice(self, index: int, sample: int, out) -> dict:
        return protocol.choice(index, self.echo_text(sample) + out.text, out.finish_reason, self.parsed.chat,
                               self.logprobs(sample, out, out.logprobs, with_prompt=self.parsed.echo))

    def event(self, request_id: str, model: str, sample: int, out) -> dict:
        """A streamed chunk for an output; the first of each choice carries the echoed prompt."""
        first = sample not in self._streaming
        self._streaming.add(sample)
        new = out.logprobs[len(out.token_ids) - len(out.new_token_ids):]
        text = (self.echo_text(sample) if first else "") + out.new_text
        return protocol.chunk(request_id, model, sample, text, out.finish_reason, self.parsed.chat,
                              logprobs=self.logprobs(sample, out, new, with_prompt=first and self.parsed.echo))

    def echo_text(self, sample: int) -> str:
        if not self.parsed.echo:
            return ""
        prompt = self.parsed.prompts[sample // self.per_prompt]
        return prompt if isinstance(prompt, str) else self._tokenizer.decode(prompt)

    def logprobs(self, sample: int, out, entries: list, with_prompt: bool) -> dict | None:
        if self.parsed.top_logprobs is None:
            return None
        if self.parsed.chat:
            return protocol.chat_logprobs(entries, self.token_text)
        if with_prompt:
            entries = [None, *(out.prompt_logprobs or []), *entries]
        offset = self._offsets.get(sample, 0)
        shaped = protocol.completion_logprobs(entries, self.prompt_of(sample)[0], self.token_text, offset)
        self._offsets[sample] = offset + sum(len(t) for t in shaped["tokens"])
        return shaped


def mean_logprob(out) -> float:
    return out.cumulative_logprob / max(1, len(out.token_ids))


async def stream_response(request, request_id, model, submission, view: ChoiceView):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chat = view.parsed.chat
    if chat:
        for index in range(len(submission.index)):
            await send(response, protocol.chunk(request_id, model, index, None, None, chat, role=True))
    completion_tokens = [0] * len(submission.index)
    try:
        # One event per token, even when its text is still held back, so clients can time every token.
        async for index, out in submission.outputs():
            event = view.event(request_id, model, index, out)
            if len(out.token_ids) == 1 and out.new_token_ids and out.first_scheduled_time is not None:
                # What a client cannot see: how long the request waited before it was first scheduled.
                event["sarathi"] = {"scheduling_delay": max(0.0, out.first_scheduled_time - out.arrival_time)}
            completion_tokens[index] += len(out.new_token_ids)
            if view.parsed.continuous_usage:
                event["usage"] = protocol.usage(len(view.prompt_of(index)), completion_tokens[index])
            await send(response, event)
    except EngineDead as e:
        await send(response, protocol.error_body(str(e), "service_unavailable"))
        return response
    if view.parsed.include_usage:
        total = protocol.usage(view.prompt_tokens, sum(completion_tokens))
        await send(response, protocol.usage_chunk(request_id, model, total, chat))
    await response.write(b"data: [DONE]\n\n")
    return response


async def send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [{
        "id": state.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "sarathi",
        "max_model_len": state.max_model_len,
    }]})


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers, and its engine is not stuck (work pending, no step
    finished for stall_timeout seconds: a hung kernel or a peer rank that stopped answering)."""
    state = request.app[STATE]
    stalled = state.engine.stalled_for(time.monotonic()) if state.engine is not None else 0.0
    if state.stall_timeout is not None and stalled > state.stall_timeout:
        return web.json_response({"status": "engine stalled", "seconds_without_a_step": round(stalled, 1)},
                                 status=503)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None:
        return web.json_response({"status": "loading"}, status=503)
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not state.engine.alive:
        return web.json_response({"status": "engine stopped"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(loaded(request.app[STATE]).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def check_admin(request: web.Request) -> None:
    token = request.app[STATE].admin_token
    if not token:
        raise RequestError("admin API disabled: set SARATHI_ADMIN_TOKEN to enable it", status=403,
                           kind="permission_error")
    if not bearer_matches(request, token):
        raise RequestError("missing or wrong admin bearer token", status=401, kind="authentication_error")


def live_config(state: ServerState) -> dict:
    engine = loaded(state).engine
    config = {"token_budget": engine.token_budget, "tbt_slo_ms": engine.tbt_slo_ms,
              "slo_margin": engine.config.scheduler.slo_margin,
              "policy": engine.config.scheduler.policy, "max_num_seqs": engine.config.scheduler.max_num_seqs,
              "max_model_len": state.max_model_len, "max_waiting": state.engine.max_waiting,
              "served_model_name": state.served_model_name}
    if engine.planner is not None:
        planner, model = engine.planner, engine.planner.model
        config["slo_planning"] = {
            "active": planner.active,
            "min_prefill_chunk": engine.config.scheduler.min_prefill_chunk,
            "samples": model.samples, "coefficients_seconds": model.coefficients(),
            "prediction_ratio_p50": model.ratio_median, "prediction_ratio_p99": model.error,
            "infeasible_iterations": planner.infeasible, "limited_iterations": planner.limited,
        }
    return config


LIVE_SETTINGS = {"token_budget": check_token_budget, "tbt_slo_ms": check_tbt_slo_ms, "slo_margin": check_slo_margin}


async def get_admin_config(request: web.Request) -> web.Response:
    check_admin(request)
    return web.json_response(live_config(request.app[STATE]))


async def patch_admin_config(request: web.Request) -> web.Response:
    """Any of {"token_budget": N, "tbt_slo_ms": N or null, "slo_margin": x}: every value is checked
    before any applies."""
    check_admin(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not body or not set(body) <= set(LIVE_SETTINGS):
        raise RequestError('the body must hold some of {"token_budget": N, "tbt_slo_ms": N or null, '
                           '"slo_margin": x}: only these change live')
    engine = loaded(request.app[STATE]).engine
    values = {}
    for name, value in body.items():
        try:
            values[name] = LIVE_SETTINGS[name](value)
        except ValueError as e:
            raise RequestError(str(e), param=name) from None
    if "token_budget" in values:
        try:
            engine.check_live_token_budget(values["token_budget"])
        except ValueError as e:
            raise RequestError(str(e), param="token_budget") from None
    if "tbt_slo_ms" in values:  # first: the engine may refuse it, and then nothing has changed
        try:
            engine.set_tbt_slo_ms(values["tbt_slo_ms"])
        except ValueError as e:
            raise RequestError(str(e), param="tbt_slo_ms") from None
    if "token_budget" in values:
        engine.set_token_budget(values["token_budget"])
    if "slo_margin" in values:
        engine.config.scheduler.slo_margin = values["slo_margin"]
    log.info("live settings changed: %s", values)
    return web.json_response(live_config(request.app[STATE]))


async def openapi(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(openapi_document(state.served_model_name, loaded(state).engine.model_config.vocab_size))


def build_app(state: ServerState, max_request_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors_as_json, api_key_required], client_max_size=max_request_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/config", get_admin_config)
    app.router.add_patch("/admin/config", patch_admin_config)
    app.router.add_get("/openapi.json", openapi)
    return app
