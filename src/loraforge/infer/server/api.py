"""The HTTP side: FastAPI routes for OpenAI's /v1/chat/completions (whole or streamed as server-sent events),
/v1/completions and /v1/models; the web chat page at `/`; /health. Errors come in OpenAI's shape.

A request becomes a Job for the scheduler's worker thread; its text comes back through an asyncio queue. A client
that disconnects cancels its job: generation for it stops, the rest of its batch goes on."""
from __future__ import annotations

import asyncio
import hmac
import time
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.infer.server.engine import Job
from loraforge.infer.server.protocol import (DEFAULT_MAX_TOKENS, APIError, ChatRequest, CompletionRequest, Reply,
                                             error_body, model_card, validation_message)
from loraforge.infer.server.scheduler import QueueFull, Scheduler

MAX_BODY_BYTES = 4 * 2**20  # a request larger than any prompt the context takes is refused unread
DISCONNECT_POLL_SECONDS = 0.25
PAGE_HEADERS = {  # the page loads nothing from elsewhere and talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


class Guard:
    """Plain ASGI, ahead of routing: the API key on /v1 (before the body is read) and the body's size."""

    def __init__(self, app, api_key: Optional[str], allowed_hosts: Optional[set[str]] = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = self._check(scope, headers)
            if problem is not None:
                return await problem(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope, headers) -> Optional[JSONResponse]:
        if self.allowed_hosts is not None and host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            # a loopback server answers only to its own names: a web page elsewhere cannot rebind a name to it
            return _error(400, "invalid Host header: this server answers to " + ", ".join(sorted(self.allowed_hosts)))
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not given.startswith(b"Bearer "):
                return _error(401, "this server needs an API key: send the header Authorization: Bearer KEY",
                              code="invalid_api_key")
            if not hmac.compare_digest(given[len(b"Bearer "):].strip(), self.api_key):
                return _error(401, "incorrect API key", code="invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is None:
                return _error(411, "send the request body with a Content-Length header")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return _error(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
        return None


def host_name(header: bytes) -> str:
    """The Host header without its port (`[::1]:8000` -> `::1`)."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class JobStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends (finished, failed, client gone)."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(data) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(served, scheduler: Scheduler, api_key: Optional[str] = None,
               allowed_hosts: Optional[set[str]] = None):
    """The ASGI app for `served` (a ServedModel) answered by `scheduler`'s worker."""
    app = FastAPI(title="loraforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}: the API is under /v1 (chat/completions, completions, "
                        "models) and the chat page at /", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(e.status_code, message.get(e.status_code, str(e.detail)))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = resources.files("loraforge.infer.server").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served.name, started)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        _check_model(name)
        return model_card(served.name, started)

    def _check_model(name: str) -> None:
        if name != served.name:
            raise APIError(404, f"the model '{name}' does not exist here; this server serves '{served.name}'",
                           param="model", code="model_not_found")

    def _job(body, prompt_ids: list[int], chat: bool) -> Job:
        if served.context and len(prompt_ids) >= served.context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and the model's context is {served.context} "
                           "tokens; shorten it", param="messages" if chat else "prompt", code="context_length_exceeded")
        limit = body.token_limit()
        if limit is None:  # OpenAI's default: as much as fits; loraforge's: DEFAULT_MAX_TOKENS
            limit = min(DEFAULT_MAX_TOKENS, served.context - len(prompt_ids)) if served.context else DEFAULT_MAX_TOKENS
        elif served.context and len(prompt_ids) + limit > served.context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens is {limit}, but the model's "
                           f"context is {served.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        temperature, top_p = body.sampling()
        user_stops = body.stop_strings()
        return Job(prompt_ids=prompt_ids, max_tokens=limit, temperature=temperature, top_p=top_p, seed=body.seed,
                   stop_ids=served.chat_stop_ids if chat else served.eos_ids,
                   stop_strings=(served.chat_stop_strings if chat else ()) + user_stops)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model)
        turns = [m.as_turn() for m in body.messages]
        from loraforge.data.templates import check_messages

        try:
            check_messages(turns)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if turns[-1]["role"] != "user":
            raise APIError(400, "messages: the last message must be the user's, the one to answer", param="messages")
        job = _job(body, served.chat_prompt_ids(turns), chat=True)
        return await _answer(job, body, request, Reply(True, served.name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model)
        text = body.text()
        if not text:
            raise APIError(400, "prompt: empty; give the text to continue", param="prompt")
        job = _job(body, served.completion_prompt_ids(text), chat=False)
        return await _answer(job, body, request, Reply(False, served.name))

    async def _answer(job: Job, body, request: Request, reply: Reply):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                job.cancel()

        job.on_done = lambda: deliver(None)
        if body.stream:
            job.on_text = deliver
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry later", type="server_error") from None
        if body.stream:
            return JobStream(_events(job, queue, reply, body.include_usage()), job)
        while True:  # whole reply: wait for the job, and cancel it if the client leaves meanwhile
            try:
                await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_SECONDS)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return _error(499, "client closed the request")
        if job.error is not None:
            return _error(500, f"generation failed: {type(job.error).__name__}: {job.error}", type="server_error")
        return reply.whole(job.text, job.finish_reason, len(job.prompt_ids), job.completion_tokens)

    async def _events(job: Job, queue: asyncio.Queue, reply: Reply, include_usage: bool):
        if reply.chat:
            yield sse(reply.chunk(role=True))
        while (piece := await queue.get()) is not None:
            yield sse(reply.chunk(piece))
        if job.error is not None:
            yield sse(error_body(f"generation failed: {type(job.error).__name__}: {job.error}", "server_error"))
            return
        yield sse(reply.chunk(finish_reason=job.finish_reason))
        if include_usage:
            yield sse(reply.usage_chunk(len(job.prompt_ids), job.completion_tokens))
        yield sse("[DONE]")

    app.state.served, app.state.scheduler = served, scheduler
    return Guard(app, api_key, allowed_hosts)
