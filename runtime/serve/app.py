"""The OpenAI-compatible HTTP app (FastAPI) on one Session's engine.

POST /v1/completions and /v1/chat/completions (streaming as server-sent events in OpenAI's chunk
format), GET /v1/models, /health and /metrics. The engine iterates on its own thread; each HTTP
request submits one engine request per choice (`n`, several prompts) and receives their
TokenEvents through one asyncio queue. A client that disconnects cancels its requests (their KV
rows are freed at once); a full queue answers 429; bad requests get OpenAI-style error JSON with
a 4xx status, and no request can stop the server. Each request logs one line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llmexport import LLMExportError

from .. import tools as tool_markup
from ..engine import QueueFull, Request, TokenEvent
from ..session import Session
from . import responses as out
from .health import EngineHealth
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, Job, job

POLL_S = 0.25  # how often a request waiting for tokens checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


@dataclass
class Run:
    """One HTTP request's engine requests (one per choice) and the queue their events arrive on."""
    ident: str
    job: Job
    requests: list[Request] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.job.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the cache, counted once per prompt (the first choice of each)."""
        firsts = {}
        for c, r in zip(self.job.choices, self.requests):
            firsts.setdefault(c.prompt, r.reused)
        return sum(firsts.values())

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


class RequestLog:
    """ASGI middleware: one line on stderr per HTTP request once its response is sent (a stream:
    once it ends): method, path, status, seconds, and for a generation its id, prompt tokens
    (and how many came from the cache), generated tokens, time to first token, finish reasons."""

    def __init__(self, app, headers: list[tuple[bytes, bytes]] = ()):
        self.app, self.headers = app, list(headers)  # added to every response (a Ray replica's name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.headers:
                    message = {**message, "headers": [*message.get("headers", ()), *self.headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            run: Run | None = scope.get("llmexport.run")
            detail = ""
            if run is not None and run.requests:
                firsts = [r.token_times[0] for r in run.requests if r.token_times]
                ttft = f"{min(firsts) - min(r.submitted_at for r in run.requests):.3f} s" if firsts else "-"
                reasons = ",".join(sorted({str(r.finish_reason) for r in run.requests}))
                detail = (f" {run.ident} prompt={run.prompt_tokens} (cached {run.cached_tokens}) "
                          f"completion={run.completion_tokens} ttft={ttft} finish={reasons}")
            print(f"{scope['method']} {scope['path']} {status[0]} {time.perf_counter() - start:.2f} s{detail}",
                  file=sys.stderr, flush=True)


def create_app(session: Session, model_name: str | None = None, labels: dict[str, str] | None = None,
               health: EngineHealth | None = None) -> FastAPI:
    """The app on `session`'s engine: `llmexport serve` runs it under uvicorn, and each Ray Serve
    replica (runtime/serve/ray_app.py) builds it over its own session, `labels` ({"replica": id})
    then marking its /metrics samples (and every response: header x-llmexport-replica), and
    `health` its own check's progress record."""
    engine = session.engine
    health = health or EngineHealth(engine)
    name = model_name or session.bundle.manifest["model"]["name"]
    metrics = Metrics(engine, labels)
    token_text = out.TokenText(session.tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown(cancel=True, timeout=30)  # after uvicorn's graceful wait: cancel what is left

    app = FastAPI(title="llmexport", lifespan=lifespan)
    replica = (labels or {}).get("replica")
    app.add_middleware(RequestLog, headers=[(b"x-llmexport-replica", replica.encode())] if replica else [])

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                          "invalid_request_error")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unknown field {where!r}: it is not part of OpenAI's API for this route",
                          "invalid_request_error", where)
        message = first.get("msg", "invalid")
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message = f"{where}={first['input']!r}: {message}"
        elif where:
            message = f"{where}: {message}"
        return _error(400, message, "invalid_request_error", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, exc: HTTPException):  # unknown routes, wrong methods
        if exc.status_code == 404:
            return _error(404, f"Unknown request URL: {request.method} {request.url.path}", "invalid_request_error",
                          code="unknown_url")
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):  # a bug in this server: say so, keep serving
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def healthy():
        problem = health.problem()  # a dead or stalled engine: 503, so a balancer or probe stops sending work
        if problem is not None:
            return _error(503, f"unhealthy: {problem}; restart the server", "server_error", code="unhealthy")
        return {"status": "ok", "model": name, "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmexport",
                                            "max_model_len": session.bundle.max_seq_len}]}

    def grammar():
        return session.grammars

    def matchers(body, work: Job) -> list:
        """One grammar matcher per choice (or None): a forced tool call, or the response format."""
        if not work.chat:
            return [None] * len(work.choices)
        make = None
        if body.tools and body.tool_choice not in (None, "auto", "none"):
            if body.tool_choice == "required":
                def make():
                    return grammar().tool_call_matcher(body.tools, None, parallel=body.parallel_tool_calls is not False)
            elif isinstance(body.tool_choice, dict) and isinstance(body.tool_choice.get("function"), dict):
                wanted = body.tool_choice["function"].get("name")

                def make():
                    return grammar().tool_call_matcher(body.tools, wanted, parallel=False)
            else:
                raise LLMExportError(f"tool_choice {body.tool_choice!r} is not one of none, auto, required or "
                                     '{"type": "function", "function": {"name": ...}}')
        elif body.response_format and body.response_format.get("type") != "text":
            def make():
                return grammar().matcher(body.response_format)
        return [make() if make else None for _ in work.choices]

    def submit(body, http: HTTPRequest, chat: bool) -> Run:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                           "invalid_request_error", "model")
        loop = asyncio.get_running_loop()
        try:
            work = job(session, body)
            if chat and body.tools:
                tool_markup.check_tools(body.tools)
            grammar_for = matchers(body, work)
        except LLMExportError as e:
            raise APIError(400, str(e)) from None
        run = Run(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", work)
        http.scope["llmexport.run"] = run  # for RequestLog's line
        try:
            for i, choice in enumerate(work.choices):
                run.requests.append(engine.submit(
                    work.prompts[choice.prompt], choice.params, index=i, score=work.score_only,
                    prompt_logprobs=work.prompt_logprobs and not work.score_only, matcher=grammar_for[i],
                    sink=lambda e: loop.call_soon_threadsafe(run.queue.put_nowait, e)))
        except QueueFull as e:
            run.cancel()
            metrics.reject()
            raise APIError(429, str(e), "rate_limit_exceeded") from None
        except LLMExportError as e:
            run.cancel()
            raise APIError(400, str(e)) from None
        return run

    async def events(run: Run, http: HTTPRequest):
        """The run's TokenEvents until every choice has finished; cancels what is left when the
        client goes away or the caller stops."""
        left = len(run.requests)
        try:
            while left:
                try:
                    event: TokenEvent = await asyncio.wait_for(run.queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason:
                    left -= 1
        finally:
            run.cancel()

    def parses_tools(body) -> bool:
        return bool(getattr(body, "tools", None)) and body.tool_choice != "none"

    def finish(reason: str | None, calls: list | None = None) -> str | None:
        if calls:
            return "tool_calls"
        return out.FINISH.get(reason, reason) if reason else None

    def echo_part(run: Run, i: int) -> tuple[str, list]:
        """The prompt's text and log-probability entries a completions choice starts with (echo)."""
        work = run.job
        if not work.echo:
            return "", []
        prompt = work.choices[i].prompt
        entries = out.prompt_entries(run.requests[i]) if work.logprobs is not None else []
        return work.prompt_texts[prompt], entries

    def logprobs_of(run: Run, i: int, entries_before: list, generated: list, offset: int = 0):
        if run.job.logprobs is None:
            return None
        if run.job.chat:
            return out.chat_logprobs(generated, token_text)
        return out.completion_logprobs(entries_before + generated, token_text, offset)

    async def respond(body, http: HTTPRequest, chat: bool):
        run = submit(body, http, chat)
        created = int(time.time())
        head = {"id": run.ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": name}
        tools = parses_tools(body)
        names = tool_markup.check_tools(body.tools) if tools else []
        if body.stream:
            return StreamingResponse(stream(run, http, head, chat, tools, names, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * len(run.requests)
        async for event in events(run, http):
            texts[event.index] += event.text
        failed = next((r for r in run.requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, failed.error or "generation failed", "server_error")
        if any(r.finish_reason in (None, "cancelled") for r in run.requests):  # the client left
            return JSONResponse({}, 499)
        choices = []
        for i, r in enumerate(run.requests):
            prefix, before = echo_part(run, i)
            if chat:
                content, calls = tool_markup.parse_tool_calls(texts[i], names) if tools else (texts[i], [])
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": logprobs_of(run, i, [], r.logprobs),
                                "finish_reason": finish(r.finish_reason, calls)})
            else:
                choices.append({"index": i, "text": prefix + texts[i],
                                "logprobs": logprobs_of(run, i, before, r.logprobs),
                                "finish_reason": finish(r.finish_reason)})
        return {"id": run.ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": choices,
                "usage": out.usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens)}

    async def stream(run: Run, http: HTTPRequest, head: dict, chat: bool, tools: bool, names: list[str], body):
        started = set()  # choices that have sent their first chunk
        held = [""] * len(run.requests)  # with tools: a choice's text, parsed when it ends
        offsets = [0] * len(run.requests)

        def chunk(choice: dict) -> str:
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        async for event in events(run, http):
            i, request = event.index, run.requests[event.index]
            if event.finish_reason == "error":
                payload = {"error": {"message": request.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(payload)}\n\n"
                return
            first = i not in started
            started.add(i)
            generated = [event.logprob] if event.logprob is not None else []
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {}
                calls = []
                if tools:
                    held[i] += event.text
                    if event.finish_reason:
                        content, calls = tool_markup.parse_tool_calls(held[i], names)
                        if content:
                            delta["content"] = content
                        if calls:
                            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                elif event.text or first:
                    delta["content"] = event.text
                yield chunk({"index": i, "delta": delta, "logprobs": logprobs_of(run, i, [], generated),
                             "finish_reason": finish(event.finish_reason, calls)})
            else:
                prefix, before = echo_part(run, i) if first else ("", [])
                text = prefix + event.text
                yield chunk({"index": i, "text": text, "logprobs": logprobs_of(run, i, before, generated, offsets[i]),
                             "finish_reason": finish(event.finish_reason)})
                offsets[i] += len(text)
        if any(r.finish_reason in (None, "cancelled") for r in run.requests):
            return  # the client left
        if body.stream_options and body.stream_options.include_usage:
            usage = out.usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens)
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await respond(body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        return await respond(body, http, chat=True)

    return app
