"""The OpenAI-compatible HTTP app (FastAPI) on one Session's engine.

POST /v1/completions and /v1/chat/completions (streaming as server-sent events in OpenAI's chunk
format), GET /v1/models, /health and /metrics. The engine iterates on its own thread; each HTTP
request submits to it and receives its TokenEvents through an asyncio queue. A client that
disconnects cancels its request (its KV row is freed at once); a full queue answers 429; bad
requests get OpenAI-style error JSON with a 4xx status, and no request can stop the server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from llmexport import LLMExportError

from ..engine import QueueFull, Request, TokenEvent
from ..session import Session
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, prompt_ids, sampling

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "max_seq_len": "length"}
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class RequestLog:
    """ASGI middleware: one line on stderr per HTTP request once its response is sent (a stream:
    once it ends): method, path, status, seconds, and for a generation its tokens and finish reason."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            request, n_prompt = scope.get("llmexport.request", (None, 0))
            tokens = (f", {n_prompt} prompt + {len(request.tokens)} completion tokens, {request.finish_reason}"
                      if request is not None else "")
            print(f"{scope['method']} {scope['path']} {status[0]} {time.perf_counter() - start:.2f} s{tokens}",
                  file=sys.stderr, flush=True)


def create_app(session: Session, model_name: str | None = None) -> FastAPI:
    engine = session.engine
    name = model_name or session.bundle.manifest["model"]["name"]
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown(cancel=True, timeout=30)  # after uvicorn's graceful wait: cancel what is left

    app = FastAPI(title="llmexport", lifespan=lifespan)
    app.add_middleware(RequestLog)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                          "invalid_request_error")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unknown field {where!r}", "invalid_request_error", where)
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error", where or None)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):  # a bug in this server: say so, keep serving
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmexport",
                                            "max_model_len": session.bundle.max_seq_len}]}

    def submit(body) -> tuple[Request, int]:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                           "invalid_request_error", "model")
        try:
            ids = prompt_ids(session, body)
            request = engine.submit_async(ids, sampling(session, body, len(ids)))
        except QueueFull as e:
            metrics.reject()
            raise APIError(429, str(e), "rate_limit_exceeded") from None
        except LLMExportError as e:
            raise APIError(400, str(e)) from None
        return request, len(ids)

    async def events(request: Request, http: HTTPRequest):
        """The request's TokenEvents; cancels it when the client goes away or the caller stops."""
        try:
            while True:
                try:
                    event: TokenEvent = await asyncio.wait_for(request.next_event(), POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason:
                    return
        finally:
            request.cancel()

    def usage(request: Request, n_prompt: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": len(request.tokens),
                "total_tokens": n_prompt + len(request.tokens)}

    async def respond(body, http: HTTPRequest, chat: bool):
        request, n_prompt = submit(body)
        http.scope["llmexport.request"] = (request, n_prompt)  # for RequestLog's line
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": name}

        def choice(text: str, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"content": text} if text else {}
                if first:
                    delta = {"role": "assistant", "content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if body.stream:
            async def sse():
                first = True
                async for event in events(request, http):
                    if event.finish_reason == "error":
                        payload = {"error": {"message": request.error, "type": "server_error", "param": None,
                                             "code": None}}
                        yield f"data: {json.dumps(payload)}\n\n"
                        return
                    reason = FINISH.get(event.finish_reason) if event.finish_reason else None
                    # one chunk per token, as OpenAI sends them (text held back mid-character or for
                    # a possible stop string makes an empty delta): clients can time every token
                    yield f"data: {json.dumps({**head, 'choices': [choice(event.text, reason, first)]})}\n\n"
                    first = False
                if body.stream_options and body.stream_options.include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(request, n_prompt)})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces = []
        async for event in events(request, http):
            pieces.append(event.text)
        if request.finish_reason == "error":
            raise APIError(500, request.error or "generation failed", "server_error")
        if request.finish_reason in (None, "cancelled"):  # the client left (its cancel may be under way)
            return JSONResponse({}, 499)
        text, reason = "".join(pieces), FINISH.get(request.finish_reason, request.finish_reason)
        if chat:
            first = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason}
        else:
            first = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": [first], "usage": usage(request, n_prompt)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await respond(body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        return await respond(body, http, chat=True)

    return app
