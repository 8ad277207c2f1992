"""`llmexport serve --ray`: the same OpenAI app on two Ray Serve replicas of a tiny bundle, on one
local Ray instance (2 CPUs, 127.0.0.1) for the whole file, against plain `serve` on the same
bundle. Completions and chat, streaming and not; 16 concurrent greedy requests; both replicas
working (their /metrics samples and Ray's Prometheus export); a replica killed under load; a damaged bundle; shutdown."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

from llmexport import LLMExportError  # noqa: E402
from llmexport.runtime.serve import ray_app  # noqa: E402
from tests.conftest import write_hf_checkpoint, write_tokenizer  # noqa: E402
from tests.runtime.test_serve import TEMPLATE, Server, _free_port  # noqa: E402

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 512  # long enough for requests still in flight when a replica is killed


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama3", tmp_path_factory.mktemp("ray-ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": MAX_SEQ_LEN}))
    write_tokenizer(ckpt / "tokenizer.json")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    return export_bundle(ckpt, tmp_path_factory.mktemp("ray") / "b", max_seq_len=MAX_SEQ_LEN, max_batch=4)


def _ray_processes() -> set[tuple[int, str]]:
    """This process's descendants that are Ray's (gcs_server, raylet, agents, workers, actors), as
    (pid, start time); a worker renames itself `ray::...`."""
    parents, started = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":  # a zombie has exited
                parents[int(entry.name)], started[int(entry.name)] = int(stat[1]), stat[19]
    found, frontier = set(), [os.getpid()]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found |= set(children)
        frontier = children
    ours = set()
    for pid in found:
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in command:
            ours.add((pid, started[pid]))
    return ours


def _alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    still = set()
    for pid, start in processes:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and stat[19] == start:
            still.add((pid, start))
    return still


class Cluster:
    """One local Ray instance with the app's 2 replicas, torn down once (close)."""

    def __init__(self, bundle: Path):
        os.environ[ray_app.PROXY_CALLBACK_ENV] = ray_app.PROXY_CALLBACK  # Ray's proxy inherits it
        self.metrics_port = _free_port()  # Ray's Prometheus export (`ray start --metrics-export-port`)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 _metrics_export_port=self.metrics_port)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.time()
        ray_app.deploy(str(bundle), ray_app.RayConfig(replicas=2, replica_cpus=0.9, model_name="tiny",
                                                      session={"max_queue": 64}), port=self.port)
        self.deploy_s = time.time() - started
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.closed = False

    def replicas(self) -> dict:
        status = serve.status().applications[ray_app.APP_NAME].deployments[ray_app.DEPLOYMENT]
        return dict(status.replica_states)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                os.environ.pop(ray_app.PROXY_CALLBACK_ENV, None)


@pytest.fixture(scope="module")
def cluster(bundle):
    c = Cluster(bundle)
    yield c
    c.close()


@pytest.fixture(scope="module")
def plain(bundle):
    """Plain `serve` (create_app under uvicorn in this process) on the same bundle."""
    s = Server(bundle, max_queue=64)
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield s
    s.close()


def _completion(client, ids, n, stream):
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        return "".join(c.choices[0].text for c in chunks)
    return client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_completions_and_chat_streaming_and_not_equal_plain_serve(cluster, plain):
    for stream in (False, True):
        assert _completion(cluster.client, [5, 6, 7, 8], 10, stream) == _completion(plain.client, [5, 6, 7, 8], 10,
                                                                                    stream)
    messages = [{"role": "system", "content": "w30 w31"}, {"role": "user", "content": "w40 w41 w42"}]

    def chat(client, stream):
        kwargs = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        if not stream:
            reply = client.chat.completions.create(**kwargs)
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    for stream in (False, True):
        assert chat(cluster.client, stream) == chat(plain.client, stream)
    assert [m.id for m in cluster.client.models.list().data] == ["tiny"]
    assert httpx.get(cluster.url + "/health").json()["status"] == "ok"
    bad = httpx.post(cluster.url + "/v1/completions", json={"model": "tiny", "prompt": "w5", "temperature": -1})
    assert bad.status_code == 400 and "temperature=-1" in bad.json()["error"]["message"]


def test_sixteen_concurrent_greedy_requests_equal_plain_serve_and_both_replicas_work(cluster, plain):
    rng = np.random.default_rng(0)
    work = [(rng.integers(3, 256, size=int(rng.integers(1, 20))).tolist(), int(rng.integers(1, 24)), i % 2 == 1)
            for i in range(16)]
    got: list = [None] * 16

    def run(i):
        ids, n, stream = work[i]
        got[i] = _completion(cluster.client, ids, n, stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [_completion(plain.client, ids, n, stream) for ids, n, stream in work]

    # each replica's generated tokens, from its own /metrics samples. A GET goes to the replica
    # Ray's router thinks least loaded: its cached counts are the last ones it saw, refreshed
    # within 10 s, so one replica can get every GET for a while after the burst
    tokens, deadline = {}, time.time() + 30
    while len(tokens) < 2 and time.time() < deadline:
        for line in httpx.get(cluster.url + "/metrics").text.splitlines():
            if line.startswith("llmexport_generated_tokens_total{"):
                tokens[line.split('replica="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        time.sleep(0.2)
    assert len(tokens) == 2 and min(tokens.values()) > 0, tokens

    exported = {}  # every replica at once: Ray's Prometheus export (each replica records every second)
    deadline = time.time() + 30
    while len(exported) < 2:
        assert time.time() < deadline, exported
        time.sleep(1)
        for line in httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text.splitlines():
            if line.startswith("ray_llmexport_generated_tokens_total{") and float(line.rsplit(" ", 1)[1]) > 0:
                exported[line.split('replica="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    assert set(exported) == set(tokens)


def test_a_conversation_goes_back_to_the_replica_that_holds_its_cache(cluster):
    """Each later turn finds the earlier turns' tokens in its replica's KV rows: by chance (the
    least-loaded of two idle replicas) all six would be 1 in 64."""
    for user in ("alice", None):  # OpenAI's user field; without it, the chat's first messages
        messages = [{"role": "system", "content": "w30 w31 w32"}, {"role": "user", "content": f"w4{len(str(user))}"}]
        before = None
        for turn in range(4):
            reply = cluster.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3,
                                                           temperature=0, extra_body={"ignore_eos": True},
                                                           **({"user": user} if user else {}))
            if before is not None:
                assert reply.usage.prompt_tokens_details.cached_tokens >= before, (user, turn, reply.usage)
            before = reply.usage.prompt_tokens
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": f"w{60 + turn}"}]


def _ongoing(client, ids, n, stream, out, i, streaming):
    """One request for the kill test; a stream counts itself in `streaming` at its first chunk."""
    try:
        if stream:
            text = ""
            for k, chunk in enumerate(client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0,
                                                                stream=True, extra_body={"ignore_eos": True})):
                if k == 0:
                    streaming.release()
                text += chunk.choices[0].text
            out[i] = ("ok", text)
        else:
            out[i] = ("ok", _completion(client, ids, n, False))
    except openai.APIStatusError as e:
        out[i] = ("status", e.status_code, e.response.headers.get("content-type"), e.body)
    except openai.APIError as e:  # an error event in a stream (the openai client raises it as APIError)
        out[i] = ("event", str(e), e.body)
    except Exception as e:  # noqa: BLE001
        out[i] = ("other", repr(e))


def _replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{ray_app.APP_NAME}#"))


def test_a_killed_replica_fails_its_requests_with_5xx_json_and_is_replaced(cluster, plain):
    rng = np.random.default_rng(1)
    work = [(rng.integers(3, 256, size=4).tolist(), MAX_SEQ_LEN - 8, i % 2 == 1) for i in range(12)]
    want = [_completion(plain.client, ids, n, stream) for ids, n, stream in work]
    got: list = [None] * len(work)
    started: queue.Queue = queue.Queue()  # the threads whose stream has begun
    streaming = type("Started", (), {"release": lambda self: started.put(threading.get_ident())})()
    served_by: dict[int, str] = {}  # thread -> the replica its response came from (x-llmexport-replica)

    def note(response):
        if "x-llmexport-replica" in response.headers:
            served_by[threading.get_ident()] = response.headers["x-llmexport-replica"]

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                           http_client=httpx.Client(event_hooks={"response": [note]}, timeout=120))
    threads = [threading.Thread(target=_ongoing, args=(client, *work[i], got, i, streaming))
               for i in range(len(work))]
    names = _replica_names()
    assert len(names) == 2
    for t in threads:
        t.start()
    busy = served_by[started.get(timeout=60)]  # a stream under way (500 tokens: well before its end)
    victim = next(n for n in names if n.endswith(busy))  # the replica serving that stream
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(120)
    assert all(not t.is_alive() for t in threads), "a request hangs"
    failed = 0
    for result, expected in zip(got, want):
        if result[0] == "ok":
            assert result[1] == expected
        elif result[0] == "status":  # not streamed (or failed before the stream began): JSON with a 5xx
            assert result[1] >= 500 and result[2].startswith("application/json"), result
            assert "replica" in result[3]["message"] or "failed" in result[3]["message"], result
            failed += 1
        else:
            assert result[0] == "event" and "stream was cut" in result[1], result  # streamed: an error event
            failed += 1
    assert failed > 0, got  # the killed replica's requests failed
    for thread, (result, expected) in zip(threads, zip(got, want)):  # the other replica's all succeeded
        if served_by.get(thread.ident) not in (None, busy):
            assert result == ("ok", expected), result
    assert _completion(cluster.client, [5, 6, 7], 6, False) == _completion(plain.client, [5, 6, 7], 6, False)
    deadline = time.time() + 90  # Ray starts a replica in the killed one's place
    while not (cluster.replicas().get("RUNNING") == 2 and len(_replica_names()) == 2
               and victim not in _replica_names()):
        assert time.time() < deadline, (cluster.replicas(), _replica_names())
        time.sleep(0.5)


def test_a_damaged_bundle_stops_its_deployment_with_the_integrity_error(cluster, bundle, tmp_path):
    import shutil

    damaged = Path(shutil.copytree(bundle, tmp_path / "damaged"))
    weights = damaged / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    started = time.time()
    with pytest.raises(LLMExportError, match="sha256 mismatch"):
        ray_app.deploy(str(damaged), ray_app.RayConfig(replicas=1, replica_cpus=0.01), port=cluster.port,
                       name="damaged", route_prefix="/damaged")
    assert time.time() - started < 60  # no loop of restarts
    serve.delete("damaged")
    assert cluster.replicas().get("RUNNING") == 2  # the healthy application goes on


def test_shutdown_leaves_no_ray_process_it_started(cluster):
    started = _ray_processes()
    assert len(started) >= 4, started  # gcs_server, raylet, the controller, the proxy, the replicas...
    cluster.close()
    deadline = time.time() + 30
    while _alive(started):
        assert time.time() < deadline, _alive(started)
        time.sleep(0.5)
