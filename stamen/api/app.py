"""The OpenAI-compatible HTTP API (FastAPI on uvicorn): ``GET /v1/models``,
``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as server-sent events.

Every request runs in its own worker thread and its own inference session; tokens reach the event
loop through a queue. A client that disconnects sets its request's cancel flag (streamed: the
SSE generator is cancelled; non-streamed: a watcher polls the connection every 0.2 s): the
worker stops at the next token and closes the session, which frees the servers' cache.
``/openapi.json`` publishes the request bodies, the replies (JSON, or ``text/event-stream`` when
streamed) and the errors (OpenAI's JSON with 400, 404, 503). ``/metrics`` serves Prometheus metrics
(requests, latencies, time to first token, tokens; ``api/metrics.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from stamen.api.engine import Engine, Event, Finished, SamplingParams, Started, TextDelta
from stamen.api.metrics import APIMetrics, MetricsMiddleware
from stamen.api.schemas import (
    CHAT_EVENTS,
    COMPLETION_EVENTS,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    _Request,
)
from stamen.errors import InvalidRequestError, RemoteCallError, ServerFullError, StamenError, SwarmNotReadyError

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client went away (nginx's convention)."""
WORKER_THREADS = 64
"""Requests generating at once; more wait for a thread."""
DISCONNECT_POLL_S = 0.2
"""How often a non-streamed request checks that its client is still connected."""
_DISCONNECTED: Any = object()
"""Queued for a non-streamed request whose client went away."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse(error=ErrorBody(message=message, type=type_, code=code,
                                                                       param=param))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", "invalid_request", param)


def _from_stamen_error(e: Exception) -> APIError:
    if isinstance(e, InvalidRequestError):
        return bad_request(str(e))
    if isinstance(e, SwarmNotReadyError):
        return APIError(503, str(e), "service_unavailable", "swarm_not_ready")
    if isinstance(e, ServerFullError):  # load, not a fault: the client may retry shortly
        return APIError(503, f"the swarm's servers are full now, retry later: {e}", "service_unavailable",
                        "servers_full")
    if isinstance(e, RemoteCallError):
        return APIError(503, f"the swarm cannot serve this request now: {e}", "service_unavailable",
                        "swarm_unavailable")
    if isinstance(e, StamenError):
        return APIError(500, f"{type(e).__name__}: {e}", "server_error", getattr(e, "code", None))
    logger.exception("unexpected error while serving a request", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = first.get("msg", str(e))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    return (f"{param}: {message}" if param else message), param


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="Stamen OpenAI-compatible API", version="1")
    limiter = anyio.CapacityLimiter(WORKER_THREADS)
    metrics = app.state.metrics = APIMetrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(404))
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(engine, model_id)
        return _model_card(engine)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletion, CHAT_EVENTS),
              openapi_extra=_request_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        prompt = _tokenize(lambda: engine.chat_prompt([m.as_template_message() for m in body.messages]))
        return await _serve(engine, limiter, request, body, prompt, chat=True, metrics=metrics)

    @app.post("/v1/completions", responses=_generation_responses(Completion, COMPLETION_EVENTS),
              openapi_extra=_request_body(CompletionRequest))
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            prompt = list(body.prompt)
            vocab = engine.model.block_config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad_request(f"prompt token ids must lie in [0, {vocab})", "prompt")
        else:
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            prompt = _tokenize(lambda: engine.text_prompt(text))
        return await _serve(engine, limiter, request, body, prompt, chat=False, metrics=metrics)

    app.openapi = lambda: _openapi(app)
    return app


_SCHEMA_REF = "#/components/schemas/{model}"
_ERROR_STATUSES = {400: "Bad request: malformed JSON, wrong types or values, unsupported options, or a prompt "
                        "and completion longer than the context",
                   404: "The model named does not exist here",
                   503: "The swarm cannot serve the request now: some blocks have no server, or the servers "
                        "are full or failing; retry later"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _ERROR_STATUSES[s]} for s in statuses}


def _generation_responses(reply: type, events: str) -> dict[int | str, dict[str, Any]]:
    """A generation route's replies: JSON without ``stream``, server-sent events with it, errors."""
    return {200: {"model": reply, "description": "The completion (JSON), or with `stream: true` its pieces as "
                                                  "server-sent events (`text/event-stream`)",
                  "content": {"text/event-stream": {"schema": {"type": "string", "description": events}}}},
            **_errors(400, 404, 503)}


def _request_body(schema: type) -> dict[str, Any]:
    """The request body as published: the bodies are parsed by our own strict models (so that
    errors are OpenAI's 400s, never FastAPI's 422s), whose JSON schemas ``_openapi`` adds."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _SCHEMA_REF.format(model=schema.__name__)}}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request bodies' schemas, less the 422 replies this API never
    sends (errors are OpenAI's JSON with 400, 404 or 503)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible completions over a Stamen swarm.")
        _, defs = models_json_schema([(m, "validation") for m in (ChatCompletionRequest, CompletionRequest)],
                                     ref_template=_SCHEMA_REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "stamen"}


def _check_model(engine: Engine, model_id: str) -> None:
    if model_id != engine.model_id:
        raise APIError(404, f"the model {model_id!r} does not exist; this server serves {engine.model_id!r}",
                       "invalid_request_error", "model_not_found", "model")


async def _parse(request: Request, schema: type[_Request]) -> Any:
    raw = await request.body()
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise bad_request(message, param) from None
    return body


def _tokenize(fn) -> list[int]:
    try:
        ids = fn()
    except InvalidRequestError as e:
        raise bad_request(str(e)) from None
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    return ids


async def _serve(engine: Engine, limiter: anyio.CapacityLimiter, request: Request, body: _Request,
                 prompt: list[int], chat: bool, metrics: APIMetrics):
    _check_model(engine, body.model)
    try:
        max_new = engine.resolve_max_tokens(len(prompt), body.limit)
        # off the event loop: a stale view is re-read from the DHT, which can take seconds after a
        # DHT peer died, and every stream of this API would wait meanwhile
        await anyio.to_thread.run_sync(engine.check_ready)  # (not the generations' limiter: never queued)
    except StamenError as e:
        raise _from_stamen_error(e) from None
    params = SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=body.stop_strings)
    job = _Job(engine, prompt, params)
    arrived = getattr(request.state, "arrived", None) or time.perf_counter()
    first_token = metrics.first_token.labels("/v1/chat/completions" if chat else "/v1/completions",
                                             str(bool(body.stream)).lower())
    job.on_first_text = lambda: first_token.observe(time.perf_counter() - arrived)
    job.on_finished = metrics.finished
    job.start(limiter)
    try:
        await job.started()  # the session is open, or an error that still gets its status code
    except Exception as e:
        job.cancel.set()
        raise _from_stamen_error(e) from None
    completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, completion_id, engine.model_id, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        done = await job.wait_finished(request)
    except Exception as e:
        raise _from_stamen_error(e) from None
    finally:
        job.cancel.set()  # a no-op once finished
    if done is None:  # nobody is listening any more
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(_full_response(completion_id, engine.model_id, chat, done))


class _Job:
    """One request's generation in a worker thread, its events delivered to the event loop."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.cancel = threading.Event()
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self.on_first_text = lambda: None
        self.on_finished = lambda prompt_tokens, completion_tokens: None
        self._texts = 0

    def start(self, limiter: anyio.CapacityLimiter) -> None:
        self._task = asyncio.ensure_future(anyio.to_thread.run_sync(self._work, limiter=limiter))

    def _put(self, item: Event | BaseException) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        try:
            self.engine.generate(self.prompt, self.params, self._put, self.cancel)
        except BaseException as e:  # delivered to the request; the thread ends cleanly
            self._put(e)

    async def next(self) -> Event:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, TextDelta) and item.text:
            self._texts += 1
            if self._texts == 1:
                self.on_first_text()
        elif isinstance(item, Finished):
            self.on_finished(item.prompt_tokens, item.completion_tokens)
        return item

    async def started(self) -> Started:
        event = await self.next()
        if not isinstance(event, Started):  # the engine always starts with Started
            raise RuntimeError(f"unexpected first event {event!r}")
        return event

    async def wait_finished(self, request: Request) -> Finished | None:
        """The final event, or None (and the work cancelled) if the client disconnects meanwhile.
        A watcher polls the connection every ``DISCONNECT_POLL_S`` whatever the events (tokens
        arrive faster than any poll period, so waiting for a quiet moment would never check)."""
        watcher = asyncio.ensure_future(self._watch(request))
        try:
            while True:
                event = await self.next()
                if event is _DISCONNECTED:
                    return None
                if isinstance(event, Finished):
                    return event
        finally:
            watcher.cancel()

    async def _watch(self, request: Request) -> None:
        while not self.cancel.is_set():
            if await request.is_disconnected():
                self.cancel.set()  # the worker stops at the next token and closes the session
                self.queue.put_nowait(_DISCONNECTED)
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _full_response(completion_id: str, model_id: str, chat: bool, done: Finished) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                  "finish_reason": done.reason}
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.reason}
    return {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice], "usage": _usage(done)}


def _chunk(completion_id: str, model_id: str, chat: bool, text: str | None, finish: str | None,
           first: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice]}


def _sse_line(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse(job: _Job, completion_id: str, model_id: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: deltas, a final chunk with the finish reason, optionally usage, [DONE].
    If the client goes away, the generator is cancelled and the finally clause stops generation."""
    try:
        if chat:
            yield _sse_line(_chunk(completion_id, model_id, chat, "", None, first=True))
        while True:
            try:
                event = await job.next()
            except Exception as e:  # the stream has started: report in-band, then end it
                yield _sse_line(_from_stamen_error(e).body.model_dump())
                break
            if isinstance(event, TextDelta):
                yield _sse_line(_chunk(completion_id, model_id, chat, event.text, None))
            elif isinstance(event, Finished):
                yield _sse_line(_chunk(completion_id, model_id, chat, None if chat else "", event.reason))
                if include_usage:
                    usage_chunk = _chunk(completion_id, model_id, chat, None, None)
                    usage_chunk["choices"], usage_chunk["usage"] = [], _usage(event)
                    yield _sse_line(usage_chunk)
                break
        yield _sse_line("[DONE]")
    finally:
        job.cancel.set()
