"""``tunelab serve``: an OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``"stream": true`` answers with
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, and
``GET /stats`` (the engine's counters: requests, batches, largest batch, tokens, queued). With an API
key every route needs ``Authorization: Bearer KEY`` (401 otherwise). Errors come as OpenAI's
``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 401, 404 unknown model,
429 queue full, 500 generation failed.

``router`` holds the routes; each gets the app's ``Served`` settings and engine, and the key check,
through ``Depends``. ``create_app`` mounts it on a FastAPI app with the error handlers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.serve.engine import Engine, Params, QueueFull
from tunelab.serve.engine import Request as InFlight  # one prompt in the engine
from tunelab.serve.loading import render_chat


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]


# Fields that would change the answer in ways this server does not implement: refused, not ignored.
UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs", "best_of", "suffix", "echo", "logit_bias")


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---- what the routes depend on ------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """``create_app``'s arguments: the engine, the model id clients send, the key and the token limits.
    One per app, on ``app.state.served``; routes get it (or its engine) through ``Depends``."""

    engine: Engine
    model_id: str
    api_key: str | None
    max_tokens_limit: int
    default_max_tokens: int
    created: int  # the "created" time /v1/models reports: when the app was made


def get_served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(get_served)]


def get_engine(s: ServedDep) -> Engine:
    return s.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def require_api_key(request: Request) -> None:
    """401 unless the request sends ``Authorization: Bearer KEY`` (when the app has a key)."""
    key = get_served(request).api_key
    if key:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")


# ---- from a request to the engine and back ------------------------------------------------------------


def _params(s: Served, body: _Body, max_tokens: int | None) -> Params:
    """The generation settings of a request, or the 4xx ApiError that says what is wrong with it."""
    if body.model != s.model_id:
        raise ApiError(404, f"model '{body.model}' is not served here; available: '{s.model_id}'", "model", "model_not_found")
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server returns one choice per request (n=1)", "n")
    for key in UNSUPPORTED:
        if (body.model_extra or {}).get(key) not in (None, False, [], 0):
            raise ApiError(400, f"'{key}' is not supported by this server", key)
    mt = max_tokens if max_tokens is not None else s.default_max_tokens
    if mt > s.max_tokens_limit:
        raise ApiError(400, f"max_tokens={mt} is above this server's limit of {s.max_tokens_limit}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not x for x in stop):
        raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
    return Params(max_tokens=mt, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed)


def _submit(engine: Engine, prompt: str, params: Params) -> InFlight:
    try:
        return engine.submit(engine.encode(prompt), params, loop=asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise ApiError(400, str(e), code="context_length_exceeded") from None


def _usage(req: InFlight) -> dict:
    p, c = len(req.prompt_ids), len(req.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str) -> str:
    return "stop" if reason in ("stop", "cancelled") else reason


async def _stream(req: InFlight, chunk, include_usage: bool, lstrip: bool):
    """Server-sent events: a first empty chunk, the text deltas, the finish reason, usage if asked, [DONE]."""
    try:
        yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
        async for kind, value in req.aevents():
            if kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                break
            if kind == "delta":
                if lstrip:
                    value = value.lstrip()
                    lstrip = not value
                if value:
                    yield f"data: {json.dumps(chunk(value, None))}\n\n"
            else:
                yield f"data: {json.dumps(chunk(None, value))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**chunk(None, None), 'choices': [], 'usage': _usage(req)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # the client went away (or we are done): free its row in the batch


async def _collect(req: InFlight) -> None:
    """Wait for the whole answer (500 if generation failed)."""
    try:
        async for kind, value in req.aevents():
            if kind == "error":
                raise ApiError(500, value)
    finally:
        req.cancel()


def _event_stream(req: InFlight, body: _Body, chunk, lstrip: bool) -> StreamingResponse:
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(_stream(req, chunk, include_usage, lstrip), media_type="text/event-stream")


# ---- the routes ---------------------------------------------------------------------------------------

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def models(s: ServedDep):
    return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": s.created, "owned_by": "tunelab"}]}


@router.get("/stats")
async def stats(engine: EngineDep):
    return dict(engine.stats)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, s: ServedDep, engine: EngineDep):
    params = _params(s, body, body.max_completion_tokens or body.max_tokens)
    prompt, stops = render_chat(engine.tok, [m.model_dump() for m in body.messages])
    params.stop += stops
    req = _submit(engine, prompt, params)
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        def chunk(text, reason, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": s.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason and _finish(reason)}]}
        return _event_stream(req, body, chunk, lstrip=True)
    await _collect(req)
    return {"id": rid, "object": "chat.completion", "created": now, "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text.strip()},
                         "finish_reason": _finish(req.finish_reason)}], "usage": _usage(req)}


@router.post("/v1/completions")
async def completions(body: CompletionBody, s: ServedDep, engine: EngineDep):
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise ApiError(400, f"prompt: give one prompt (got a list of {len(body.prompt)})", "prompt")
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    params = _params(s, body, body.max_tokens if body.max_tokens is not None else 16)  # OpenAI's default
    req = _submit(engine, prompt, params)
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        def chunk(text, reason, first=False):
            return {"id": rid, "object": "text_completion", "created": now, "model": s.model_id,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                 "finish_reason": reason and _finish(reason)}]}
        return _event_stream(req, body, chunk, lstrip=False)
    await _collect(req)
    return {"id": rid, "object": "text_completion", "created": now, "model": s.model_id,
            "choices": [{"index": 0, "text": req.text, "logprobs": None, "finish_reason": _finish(req.finish_reason)}],
            "usage": _usage(req)}


# ---- the app ------------------------------------------------------------------------------------------


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    if e.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}")
    return _error(400, f"{where or 'body'}: {e['msg']}", param=where or None)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.code)


async def _key_before_routing(request: Request, call_next):
    """The router's key check, run again in front of routing: requests that reach no route's
    dependencies (unknown paths and methods, /openapi.json, a body that is not JSON) get 401 too."""
    try:
        require_api_key(request)
    except ApiError as e:
        return _error(e.status, e.message, e.param, e.code)
    return await call_next(request)


def create_app(engine: Engine, model_id: str, *, api_key: str | None = None, max_tokens_limit: int = 2048,
               default_max_tokens: int = 256) -> FastAPI:
    """The app serving ``engine`` as ``model_id``: ``router``, its settings, OpenAI-shaped errors and the key
    check in front of routing."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    app.state.served = Served(engine, model_id, api_key, max_tokens_limit, default_max_tokens, int(time.time()))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.middleware("http")(_key_before_routing)
    app.include_router(router)
    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
