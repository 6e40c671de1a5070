"""The HTTP routes (Starlette): OpenAI's completions, chat completions and models, /health, and the chat page at /.

Handlers check and encode a request, hand its sequences to the scheduler, and turn the chunks that come back into a
response or an SSE stream. A client that disconnects cancels its sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llama.server import schemas
from llama.server.scheduler import Failed, Finished, Job, QueueFull, Scheduler, Unavailable
from llama.server.schemas import ApiError, Choice, ModelContext, Request

logger = logging.getLogger(__name__)

PUBLIC_PATHS = ("/health", "/")  # no API key needed: the health check, and the static chat page (it asks for the key)
RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The server's settings beyond the model's."""

    model_name: str
    api_key: Optional[str] = None
    cors_origins: tuple = ()
    max_body_bytes: int = 4 * 2**20
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_max_tokens: Optional[int] = None
    extra_stop: tuple = ()


def create_app(config: ServerConfig, scheduler: Scheduler) -> Starlette:
    """The ASGI app; it answers 503 until ``scheduler`` has a model."""
    contexts: List[ModelContext] = []

    def context() -> ModelContext:
        if scheduler.error is not None:
            raise ApiError(503, scheduler.error, "server_error", code="server_failed")
        llama = scheduler.llama
        if llama is None:
            raise ApiError(503, "the model is still loading; retry shortly", "server_error", code="model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if not contexts:
            contexts.append(ModelContext(
                config.model_name, llama.tokenizer, llama.chat_format, llama.model.params.max_seq_len, llama.model.vocab_size,
                config.default_temperature, config.default_top_p, config.default_max_tokens, config.extra_stop,
            ))
        return contexts[0]

    async def health(request: HttpRequest) -> Response:
        if scheduler.error is not None:
            return JSONResponse({"status": "error", "error": scheduler.error}, 503)
        if scheduler.llama is None:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok", **scheduler.load()})

    created = int(time.time())

    def model_card() -> Dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "llama"}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: HttpRequest) -> Response:
        name = request.path_params["model"]
        if name != config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def completions(request: HttpRequest) -> Response:
        return await _generate(request, schemas.parse_completion)

    async def chat_completions(request: HttpRequest) -> Response:
        return await _generate(request, schemas.parse_chat)

    async def _generate(request: HttpRequest, parse: Callable[[Dict[str, Any], ModelContext], Request]) -> Response:
        ctx = context()
        body = await _read_json(request, config.max_body_bytes)
        req = await run_in_threadpool(parse, body, ctx)
        job = Job(req.specs(), asyncio.get_running_loop(), req.logprobs, req.top_logprobs)
        if len(job.specs) > scheduler.capacity:
            raise schemas.bad("n", f"the request makes {len(job.specs)} sequences; this server runs or queues at most "
                              f"{scheduler.capacity} (--max_batch_size plus --max_queue)")
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry shortly", "server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Unavailable as e:
            raise ApiError(503, str(e), "server_error", code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        response_id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": response_id, "object": "", "created": int(time.time()), "model": ctx.name}
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_events(job, req, head), media_type="text/event-stream", headers=headers)
        return await _collect(request, job, req, head)

    async def _events(job: Job, req: Request, head: Dict[str, Any]) -> AsyncIterator[str]:
        """The SSE stream: the role first (chat), a chunk per new text, the usage chunk when asked for, then [DONE]."""
        head = {**head, "object": "chat.completion.chunk" if req.chat else "text_completion"}
        offsets = {spec.index: 0 for spec in job.specs}  # completions: text length sent per choice, for text_offset
        echo_start = {spec.index: req.echo for spec in job.specs}

        def event(choices: List[Dict[str, Any]], usage: Optional[Dict[str, int]] = None) -> str:
            data = {**head, "choices": choices}
            if req.include_usage:
                data["usage"] = usage
            return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"

        try:
            if req.chat:
                for spec in job.specs:
                    yield event([schemas.chat_choice_chunk(spec.index, None, False, first=True)])
            while True:
                item = await job.events.get()
                if isinstance(item, Finished):
                    if req.include_usage:
                        yield event([], schemas.usage(req.prompt_tokens, item.completion_tokens))
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, Failed):
                    yield "data: " + json.dumps(ApiError(503, item.message, "server_error", code="server_failed").body()) + "\n\n"
                    return
                index = item["index"]
                if req.chat:
                    yield event([schemas.chat_choice_chunk(index, item, req.logprobs)])
                else:
                    logprobs = schemas.completion_logprobs(item, offsets[index], echo_start[index]) if req.logprobs else None
                    echo_start[index] = False
                    offsets[index] += len(item["text"])
                    choice = {"index": index, "text": item["text"], "logprobs": logprobs, "finish_reason": item["finish_reason"]}
                    yield event([choice])
        finally:
            scheduler.cancel(job)  # a no-op once it has finished; else its client has gone

    async def _collect(request: HttpRequest, job: Job, req: Request, head: Dict[str, Any]) -> Response:
        """The whole response once every choice has finished; a client that leaves first cancels the job."""
        choices = {spec.index: Choice(spec.index) for spec in job.specs}

        async def drain() -> Union[Finished, Failed]:
            while True:
                item = await job.events.get()
                if isinstance(item, (Finished, Failed)):
                    return item
                choices[item["index"]].add(item)

        waiter, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
                scheduler.cancel(job)
        if waiter.cancelled():
            return Response(status_code=499)  # nobody reads it: the client has gone
        end = waiter.result()
        if isinstance(end, Failed):
            raise ApiError(503, end.message, "server_error", code="server_failed")
        ordered = [choices[i] for i in sorted(choices)]
        body = {**head, "object": "chat.completion" if req.chat else "text_completion",
                "choices": [_choice(c, req) for c in ordered], "usage": schemas.usage(req.prompt_tokens, end.completion_tokens)}
        return JSONResponse(body)

    def _choice(choice: Choice, req: Request) -> Dict[str, Any]:
        scores = {"tokens": choice.tokens, "logprobs": choice.token_logprobs}
        if req.top_logprobs:
            scores["top_logprobs"] = choice.top_logprobs
        if req.chat:
            return {"index": choice.index, "message": {"role": "assistant", "content": choice.text, "refusal": None},
                    "logprobs": schemas.chat_logprobs(scores) if req.logprobs else None, "finish_reason": choice.finish_reason}
        logprobs = schemas.completion_logprobs(scores, 0, req.echo) if req.logprobs else None
        return {"index": choice.index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    page = resources.files("llama.server").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: HttpRequest) -> Response:
        return HTMLResponse(page.replace("__MODEL__", json.dumps(config.model_name)))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        ))
    if config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=config.api_key))
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)  # type: ignore[arg-type]


class ApiKeyMiddleware:
    """401 for every request without ``Authorization: Bearer KEY``, but the public paths and CORS preflights."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if not token:
                message = "missing API key: send the header 'Authorization: Bearer KEY' with the key the server was started with"
            elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                message = "incorrect API key: send the header 'Authorization: Bearer KEY' with the key the server was started with"
            else:
                message = ""
            if message:
                error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _api_error(None, error)(scope, receive, send)  # type: ignore[arg-type]
                return
        await self.app(scope, receive, send)


async def _read_json(request: HttpRequest, limit: int) -> Any:
    """The body parsed as JSON, refused past ``limit`` bytes (413) or when it is not JSON (400)."""
    length = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body exceeds {limit} bytes (the server's --max_body_bytes)", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the body") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def _disconnected(request: HttpRequest) -> None:
    """Return once the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _api_error(request: Optional[HttpRequest], error: ApiError) -> Response:
    return JSONResponse(error.body(), error.status, headers=error.headers)


def _http_error(request: HttpRequest, error: HTTPException) -> Response:
    if error.status_code == 404:
        message = f"no such path: {request.method} {request.url.path}; the API is under /v1 (/v1/models, /v1/completions, /v1/chat/completions)"
    else:
        message = f"{request.method} {request.url.path}: {error.detail}"
    api_error = ApiError(error.status_code, message, code="not_found" if error.status_code == 404 else None, headers=error.headers)
    return _api_error(request, api_error)


def _server_error(request: HttpRequest, error: Exception) -> Response:
    logger.exception("error while answering %s %s", request.method, request.url.path, exc_info=error)
    return _api_error(request, ApiError(500, f"internal server error: {type(error).__name__}: {error}", "server_error"))
