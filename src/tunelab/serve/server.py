"""``tunelab serve``: an OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``"stream": true`` answers with
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, and
``GET /stats`` (the engine's counters: requests, batches, largest batch, tokens, queued). With an API
key every route needs ``Authorization: Bearer KEY`` (401 otherwise). Every error, whatever went wrong
(a body that is not JSON, not UTF-8 or not application/json included), comes as OpenAI's
``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 401, 404 unknown model or path,
413 body too large, 429 queue full, 500 generation failed.

One client never takes the others down: bodies are capped (``max_body_bytes``, checked before they are
read whole), tokenization runs off the event loop, and a request that makes its batch fail is retried
alone so the others still get their answers.

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
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stream: StrictBool = False  # "yes" is not a boolean
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str  # only "text" is served; others (image_url, input_audio, ...) get a 400 naming them
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, function_call: refused by name below
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]


# Fields that would change the answer in ways this server does not implement: refused, not ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "frequency_penalty", "presence_penalty", "repetition_penalty", "logprobs", "top_logprobs", "best_of",
               "suffix", "echo", "logit_bias")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _check_messages(messages: list[Message]) -> list[dict]:
    """{role, content} dicts of the chat, or a 400 naming the message and what tunelab does not serve."""
    out = []
    for i, m in enumerate(messages):
        for key in ("tool_calls", "function_call"):
            if (m.model_extra or {}).get(key):
                raise ApiError(400, f"messages.{i}.{key}: tool calls are not supported by tunelab serve", f"messages.{i}.{key}")
        if m.content is None:
            raise ApiError(400, f"messages.{i}.content: missing (null)", f"messages.{i}.content")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages.{i}.content.{j}: a '{part.type}' part is not supported by tunelab "
                                   "serve (text parts only)", f"messages.{i}.content.{j}")
        out.append({"role": m.role, "content": m.content if isinstance(m.content, str)
                    else [{"type": "text", "text": p.text} for p in m.content]})
    return out


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
        value = (body.model_extra or {}).get(key)
        if value not in (None, False, [], 0, "none") and value != {"type": "text"}:
            raise ApiError(400, f"'{key}' is not supported by this server (tunelab serve)", key)
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed={body.seed} is outside {SEED_RANGE[0]}..{SEED_RANGE[1]}", "seed")
    mt = max_tokens
    if mt is not None and mt > s.max_tokens_limit:
        raise ApiError(400, f"max_tokens={mt} is above this server's limit of {s.max_tokens_limit}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not x for x in stop):
        raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
    return Params(max_tokens=mt, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed)


async def _submit(s: Served, engine: Engine, prompt: str, params: Params, default: int | None = None) -> InFlight:
    """Tokenize off the event loop (a huge prompt must not stall other clients), then queue the request.
    Without a client max_tokens the default is cut to what the context leaves after the prompt."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the prompt holds a character that is not valid Unicode text ({e.reason} at "
                       f"position {e.start}: {prompt[e.start]!r})") from None
    ids = await asyncio.to_thread(engine.encode, prompt)
    if params.max_tokens is None:
        left = (engine.context_len - len(ids)) if engine.context_len else s.default_max_tokens
        if left < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, which fills the model's context of "
                           f"{engine.context_len} tokens: no room for an answer", code="context_length_exceeded")
        params.max_tokens = min(default or s.default_max_tokens, s.max_tokens_limit, left)
    try:
        return engine.submit(ids, params, loop=asyncio.get_running_loop())
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
    messages = _check_messages(body.messages)
    try:
        prompt, stops = await asyncio.to_thread(render_chat, engine.tok, messages)
    except Exception as e:  # noqa: BLE001  (a chat template that refuses the conversation, e.g. role order)
        raise ApiError(400, f"messages: the model's chat template refused them ({type(e).__name__}: {e})", "messages") from None
    params.stop += stops
    req = await _submit(s, engine, prompt, params)
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
    params = _params(s, body, body.max_tokens)
    req = await _submit(s, engine, prompt, params, default=16)  # OpenAI's default, cut to the context left
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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404), wrong methods (405) and the like, in OpenAI's shape too."""
    text = {404: f"no route {request.method} {request.url.path} (see /v1/models, /v1/chat/completions, "
                 "/v1/completions)", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(exc.status_code, text.get(exc.status_code, str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug must not answer with a traceback: one OpenAI-shaped 500 naming the error type."""
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class BodyGuard:
    """In front of everything (plain ASGI): a POST body is capped at ``limit`` bytes (413 from the
    Content-Length alone, or as soon as a chunked body passes it; never read whole first), must be
    ``application/json`` (or carry no type), UTF-8, and a JSON object; else one OpenAI-shaped 4xx."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def refuse(status: int, message: str, code: str | None = None):
            await _error(status, message, code=code)(scope, receive, send)

        too_big = (f"the request body is larger than this server's limit of {self.limit} bytes "
                   "(tunelab serve --max-body-mb)")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await refuse(413, too_big, "request_too_large")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("", "application/json"):
            return await refuse(415, f"Content-Type '{ctype}': send the request body as JSON "
                                "(Content-Type: application/json)", "unsupported_media_type")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await refuse(413, too_big, "request_too_large")
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        if scope["path"].startswith("/v1/"):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                return await refuse(400, f"the request body is not UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})")
            try:
                obj = json.loads(text)
            except ValueError as e:
                return await refuse(400, f"the request body is not valid JSON: {e}")
            if not isinstance(obj, dict):
                return await refuse(400, f"the request body must be a JSON object, got {type(obj).__name__}")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _key_before_routing(request: Request, call_next):
    """The router's key check, run again in front of routing: requests that reach no route's
    dependencies (unknown paths and methods, /openapi.json, a body that is not JSON) get 401 too."""
    try:
        require_api_key(request)
    except ApiError as e:
        return _error(e.status, e.message, e.param, e.code)
    return await call_next(request)


MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(engine: Engine, model_id: str, *, api_key: str | None = None, max_tokens_limit: int = 2048,
               default_max_tokens: int = 256, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving ``engine`` as ``model_id``: ``router``, its settings, OpenAI-shaped errors, the key
    check in front of routing and the body guard (``max_body_bytes``) in front of that."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    app.state.served = Served(engine, model_id, api_key, max_tokens_limit, default_max_tokens, int(time.time()))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyGuard, limit=max_body_bytes)
    app.middleware("http")(_key_before_routing)  # added last: runs first (401 before anything else)
    app.include_router(router)
    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
