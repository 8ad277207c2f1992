"""runtime/serve/ray_proxy.py, the middleware that runs in Ray Serve's HTTP proxy, driven as ASGI
without Ray: the conversation key it adds as a header (body passed on unchanged), and OpenAI error
JSON when the replica behind it ends a response without an answer or cuts a stream."""

from __future__ import annotations

import asyncio
import json

from llmexport.runtime.serve.ray_proxy import AFFINITY_HEADER, OpenAIProxyMiddleware, affinity_key


def _call(app, body: bytes = b"", path: str = "/v1/completions", method: str = "POST"):
    """Run the middleware around `app` on one request: (messages sent, scope and body the app saw)."""
    sent, seen = [], {}

    async def inner(scope, receive, send):
        seen["scope"], seen["body"] = scope, (await receive())["body"]
        await app(send)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(OpenAIProxyMiddleware(inner)(scope, receive, send))
    return sent, seen


def _ok(send):
    async def answer():
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})
    return answer()


def test_the_conversation_key_is_the_user_or_the_prompt_start():
    assert affinity_key({"user": "alice", "prompt": "w5"}) == "user:alice"
    turn1 = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    turn2 = {"messages": turn1["messages"] + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]}
    assert affinity_key(turn1) == affinity_key(turn2) != affinity_key({"messages": turn1["messages"][:1]})
    long = list(range(3, 200))
    assert affinity_key({"prompt": long}) == affinity_key({"prompt": long[:64] + [7]})  # the first 64 tokens
    assert affinity_key({"prompt": "x" * 300}) == affinity_key({"prompt": "x" * 256 + "y"})
    assert affinity_key({"prompt": []}) is None and affinity_key({}) is None


def test_the_key_goes_in_a_header_and_the_body_is_unchanged():
    body = json.dumps({"model": "m", "prompt": "w5 w6", "user": "bob"}).encode()
    sent, seen = _call(_ok, body)
    assert seen["body"] == body and dict(seen["scope"]["headers"])[AFFINITY_HEADER] == b"user:bob"
    assert sent[0]["status"] == 200
    _, seen = _call(_ok, b'{"broken": ')  # the app answers malformed JSON itself
    assert AFFINITY_HEADER not in dict(seen["scope"]["headers"]) and seen["body"] == b'{"broken": '


def test_no_answer_from_the_replica_becomes_a_503_with_openai_error_json():
    async def died(send):
        return None  # Ray's proxy ends like this when the replica actor dies before answering

    sent, _ = _call(lambda send: died(send), b"{}")
    assert sent[0]["status"] == 503 and (b"content-type", b"application/json") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "server_error" and error["code"] == "replica_failed"


def test_a_cut_stream_ends_with_an_error_event():
    async def cut(send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    sent, _ = _call(lambda send: cut(send), b"{}")
    assert sent[-1]["more_body"] is False and sent[-1]["body"].startswith(b"data: ")
    assert "stream was cut" in json.loads(sent[-1]["body"][6:])["error"]["message"]


def test_rays_plain_text_errors_become_openai_error_json():
    async def busy(send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    sent, _ = _call(lambda send: busy(send), b"{}")
    assert sent[0]["status"] == 503 and (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["message"] == "Request dropped due to backpressure"
    assert len(sent) == 2


def test_a_whole_answer_passes_through_untouched():
    sent, _ = _call(_ok, b"{}", path="/health", method="GET")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[1]["body"] == b"{}"


def test_plain_serve_and_the_cli_never_import_ray():
    import subprocess
    import sys

    script = ("import sys, llmexport.cli, llmexport.runtime.serve, llmexport.runtime.serve.app, "
              "llmexport.runtime.serve.ray_proxy, llmexport.runtime.serve.kuberay; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_stream_ray_closes_without_its_end_gets_an_error_event_and_a_finished_one_does_not():
    async def closed(send, tail):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n' + tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent, _ = _call(lambda send: closed(send, b""), b"{}")
    assert b"stream was cut" in sent[-2]["body"] and sent[-1]["more_body"] is False
    for tail in (b"data: [DONE]\n\n", b'data: {"error": {"message": "x"}}\n\n'):
        sent, _ = _call(lambda send: closed(send, tail), b"{}")
        assert not any(b"stream was cut" in m.get("body", b"") for m in sent)
