"""ASGI middleware that runs inside Ray Serve's HTTP proxy, in front of every replica.

Ray loads it through its documented proxy hook: the environment variable
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=llmexport.runtime.serve.ray_proxy.middlewares, set by
`llmexport serve --ray` for the Ray instance it starts (a cluster started with `ray start` needs
it in that command's environment). It does two things a replica cannot do for itself:

- **Affinity key.** The proxy hands a replica the request's headers, not its body, so Ray's
  router cannot read the body. This reads the JSON body once, derives the conversation's key
  (OpenAI's `user` field, else a hash of the prompt's first block: its first 64 token ids or
  256 characters, or a chat's first two messages) and adds it as the header
  `x-llmexport-affinity` for runtime/serve/ray_router.py; the body is passed on unchanged.
- **Errors as OpenAI JSON.** When the replica serving a request dies, Ray's proxy ends the
  response without a body (uvicorn would answer a plain-text 500) or cuts a stream short. This
  answers 503 with OpenAI's error JSON if nothing was sent yet, and ends a cut server-sent-event
  stream with an error event (`data: {"error": ...}`, which the openai client raises). A
  non-streamed body is sent by the app in one message, so it is never half-written. Ray's own
  plain-text errors (408, 503 backpressure) become the same JSON.
"""

from __future__ import annotations

import hashlib
import json

AFFINITY_HEADER = b"x-llmexport-affinity"
BLOCK_TOKENS = 64
BLOCK_CHARS = 256


def affinity_key(body: dict) -> str | None:
    """The conversation a request belongs to, or None (no preference: least loaded)."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    if isinstance(body.get("messages"), list) and body["messages"]:
        first = json.dumps(body["messages"][:2], sort_keys=True)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # several prompts: the first one's conversation
        if isinstance(prompt, str) and prompt:
            first = prompt[:BLOCK_CHARS]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            first = ",".join(map(str, prompt[:BLOCK_TOKENS]))
        else:
            return None
    return "prefix:" + hashlib.sha256(first.encode()).hexdigest()[:24]


def _error_body(message: str, kind: str = "server_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class OpenAIProxyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/"):
            scope, receive = await self._with_affinity(scope, receive)
        state = {"started": False, "open": False, "stream": False, "held": None, "tail": b""}

        async def watch(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                kind = headers.get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    state["held"] = (message, [])  # Ray's own plain-text error: rewrite it below
                    return
                state["started"], state["open"] = True, True
                state["stream"] = kind.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if state["held"] is not None:
                    state["held"][1].append(message.get("body", b""))
                    if not message.get("more_body", False):
                        await self._rewrite(send, *state["held"])
                        state["held"], state["started"] = None, True
                    return
                state["open"] = message.get("more_body", False)
                if state["stream"]:
                    if message.get("body"):
                        state["tail"] = message["body"][-64:]
                    if not state["open"] and not _ended(state["tail"]):  # Ray closed a cut stream itself
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": _cut_event("the replica serving it stopped")})
            await send(message)

        failure = None
        try:
            await self.app(scope, receive, watch)
        except Exception as e:  # noqa: BLE001  (the proxy's own failure: still answer in OpenAI's format)
            failure = e
        reason = f"{type(failure).__name__}: {failure}" if failure else "the replica serving it stopped"
        if state["held"] is not None:
            await self._rewrite(send, *state["held"])
        elif not state["started"]:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": _error_body(
                f"the request failed before an answer: {reason}; retry it", code="replica_failed")})
        elif state["open"]:
            tail = _cut_event(reason) if state["stream"] and not _ended(state["tail"]) else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    @staticmethod
    async def _rewrite(send, start: dict, parts: list[bytes]) -> None:
        text = b"".join(parts).decode(errors="replace").strip() or f"HTTP {start['status']}"
        await send({"type": "http.response.start", "status": start["status"],
                    "headers": [(k, v) for k, v in start.get("headers") or [] if k.lower() not in
                                (b"content-type", b"content-length")] + [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": _error_body(text)})

    @staticmethod
    async def _with_affinity(scope, receive):
        """Read the body; add the affinity header; replay the body to the app."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return scope, _replay([message], receive)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            key = affinity_key(parsed) if isinstance(parsed, dict) else None
        except ValueError:  # the app answers malformed JSON with its own 400
            key = None
        if key is not None:
            scope = {**scope, "headers": [*scope.get("headers", []), (AFFINITY_HEADER, key.encode())]}
        return scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _cut_event(reason: str) -> bytes:
    return b"data: " + _error_body(f"the stream was cut: {reason}; retry the request", code="replica_failed") + b"\n\n"


def _ended(tail: bytes) -> bool:
    """Whether a server-sent-event stream's last bytes are an end the app wrote: [DONE] or an error event."""
    last = tail.rstrip().rpartition(b"data: ")[2]
    return last == b"[DONE]" or last.startswith(b'{"error"')


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


def middlewares() -> list:
    """What Ray's proxy hook calls: Starlette Middleware entries."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIProxyMiddleware)]
