"""`llmexport serve` through the real `openai` client: completions and chat, streaming and not,
concurrent requests arriving at random times, cancellation, bad requests, 429, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx")

from llmexport.runtime.sampling import SamplingParams  # noqa: E402
from llmexport.runtime.session import Session  # noqa: E402
from tests.conftest import write_hf_checkpoint, write_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ 'w20 ' + m['role'] + ' w21 ' + m['content'] + ' w22 ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'w20 assistant w21 ' }}{% endif %}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny llama bundle with a word-level tokenizer ("w5 w6" <-> [5, 6]) and a chat template."""
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama3", tmp_path_factory.mktemp("serve-ckpt"))
    write_tokenizer(ckpt / "tokenizer.json")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    return export_bundle(ckpt, tmp_path_factory.mktemp("serve") / "b", max_seq_len=64, max_batch=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app on a uvicorn server in a thread of this process."""

    def __init__(self, bundle, **session_kwargs):
        import uvicorn

        from llmexport.runtime.serve.app import create_app

        self.session = Session(bundle, threads=2, **session_kwargs)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.session, "tiny"), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.session.close()


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle, max_queue=64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def alone(bundle):
    """Greedy tokens of a prompt run alone on its own session: the expected answer."""
    session = Session(bundle, threads=2)
    yield lambda ids, n: session.generate([ids], SamplingParams(max_new_tokens=n, ignore_eos=True)).token_ids[0]
    session.close()


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_completions_and_chat_streaming_and_not(server, alone):
    client = server.client
    ids = [5, 6, 7, 8]
    encoded = server.session.tokenizer.encode(_words(ids))
    want = _words(alone(encoded, 10))
    done = client.completions.create(model="tiny", prompt=_words(ids), max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(encoded) and done.usage.completion_tokens == 10
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == _words(alone(ids, 10))
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "w30 w31"}, {"role": "user", "content": "w40 w41 w42"}]
    with Session(server.session.bundle.path) as reference:
        rendered = reference.render_chat(messages)
    want = _words(alone(rendered, 8))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_strings_and_models_and_health(server, alone):
    ids = [9, 10, 11]
    tokens = alone(ids, 12)
    stop = _words(tokens[4:6])
    done = server.client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stop=[stop],
                                            extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].text == _words(tokens[:4]) + " "
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_sixteen_concurrent_requests_arriving_at_random_get_their_alone_tokens(server, alone):
    rng = np.random.default_rng(0)
    work = [(rng.integers(3, 256, size=int(rng.integers(1, 20))).tolist(), int(rng.integers(1, 16)))
            for _ in range(16)]
    delays = rng.uniform(0, 0.5, size=16)
    got: list = [None] * 16

    def run(i):
        time.sleep(delays[i])
        ids, n = work[i]
        if i % 2:
            stream = server.client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
            got[i] = "".join(c.choices[0].text for c in stream)
        else:
            got[i] = server.client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0,
                                                      extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [_words(alone(ids, n)) for ids, n in work]


@pytest.fixture
def slow(server):
    """Each engine step of the shared server takes 20 ms more (the tiny model would finish a whole
    request before a client could leave it)."""
    backend = server.session.backend
    real = backend.step

    def step(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    backend.step = step
    yield
    backend.step = real


def test_a_client_that_disconnects_frees_its_row(server, alone, slow):
    engine = server.session.engine
    streams = [server.client.completions.create(model="tiny", prompt=[5, 6], max_tokens=50, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}) for _ in range(4)]
    for s in streams:
        next(iter(s))
    assert engine.rows.in_use == 4
    for s in streams[:3]:
        s.close()  # the connection goes away mid-stream
    deadline = time.time() + 10
    while engine.rows.in_use > 1:
        assert time.time() < deadline, f"{engine.rows.in_use} rows still held"
        time.sleep(0.05)
    done = server.client.completions.create(model="tiny", prompt=[7, 8], max_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert done.choices[0].text == _words(alone([7, 8], 5))
    streams[3].close()


@pytest.mark.parametrize("body, message", [
    (b'{"model": "tiny", "prompt": "w5", ', "not valid JSON"),
    ({"model": "tiny", "prompt": "w5", "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": 500}, "max_tokens=500 plus the prompt's 1 tokens exceeds"),
    ({"model": "tiny", "prompt": "w5", "temperature": -1}, "temperature=-1"),
    ({"model": "tiny", "prompt": list(range(3, 70))}, "exceeds the bundle's max_seq_len=64"),
    ({"model": "tiny", "prompt": [300]}, "outside the vocabulary"),
    ({"model": "tiny", "prompt": "w5", "suffix": "w6"}, "suffix is not supported"),
    ({"model": "tiny", "prompt": "w5", "n": 0}, "n=0"),
    ({"model": "tiny", "prompt": "w5", "temperature": 2.5}, "temperature=2.5"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": 0}, "max_tokens=0 generates nothing"),
    ({"model": "tiny", "prompt": "w5", "logit_bias": {"x": 1}}, "logit_bias key 'x'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "audio": {}}, "audio is not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, "needs logprobs"),
    ({"model": "tiny", "prompt": "w5", "stop": ""}, "stop strings must be non-empty"),
    ({"model": "other", "prompt": "w5"}, "does not exist"),
    ({"model": "tiny", "messages": []}, "messages is empty"),
    ({"model": "tiny", "messages": [{"role": "user"}], "max_tokens": "many"}, "max_tokens"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_goes_on(server, body, message):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    answer = httpx.post(server.url + path, timeout=30, **kwargs)
    assert 400 <= answer.status_code < 500, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_are_prometheus_text(server):
    server.client.completions.create(model="tiny", prompt=[5], max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[0] != "#"}
    assert values["llmexport_queue_depth"] == 0 and "llmexport_running_requests" in values
    assert values["llmexport_generated_tokens_total"] >= 3
    assert values["llmexport_time_to_first_token_seconds_count"] >= 1
    assert values["llmexport_inter_token_latency_seconds_count"] >= 2
    assert values['llmexport_requests_total{finish_reason="length"}'] >= 1
    assert "# TYPE llmexport_time_to_first_token_seconds histogram" in text


def test_a_full_queue_answers_429_at_once(bundle):
    server = Server(bundle, max_queue=0)
    real = server.session.backend.step
    server.session.backend.step = lambda *args, **kwargs: (time.sleep(0.02), real(*args, **kwargs))[1]
    try:
        streams = [server.client.completions.create(model="tiny", prompt=[5], max_tokens=60, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}) for _ in range(4)]
        started = time.time()
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            server.client.completions.create(model="tiny", prompt=[5], max_tokens=5)
        assert time.time() - started < 5
        for s in streams:
            s.close()
    finally:
        server.close()


def test_sigterm_finishes_in_flight_requests_and_exits(tmp_path):
    """A 3,000-token stream is under way when SIGTERM comes: it still ends with all its tokens, and
    the server exits 0."""
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama3", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    write_tokenizer(ckpt / "tokenizer.json")
    long_bundle = export_bundle(ckpt, tmp_path / "bundle", max_seq_len=4096, max_batch=1)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", "from llmexport.cli import main; main()", "serve", "--bundle",
                                str(long_bundle), "--port", str(port), "--threads", "2", "--shutdown-timeout", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=client.models.list().data[0].id, prompt=[5, 6], max_tokens=3000,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3000
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
