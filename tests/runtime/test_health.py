"""A hung or dead engine fails its health check (runtime/serve/health.py): the Ray replica's
check_health raises (Ray then replaces the replica) and plain serve's /health answers 503. The
hang is real: the backend's step blocks on an event inside a running engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llmexport import LLMExportError
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.serve.health import EngineHealth
from llmexport.runtime.session import Session

httpx = pytest.importorskip("httpx")


@pytest.fixture
def session(bundle_factory):
    with Session(bundle_factory("llama3", "ort")[0], threads=1) as s:
        s.engine.start()
        yield s


@pytest.fixture
def hang(session):
    """hang() makes every later backend step block until the test ends."""
    release = threading.Event()
    step = session.engine.backend.step

    def blocked(*args, **kwargs):
        release.wait()
        return step(*args, **kwargs)

    yield lambda: setattr(session.engine.backend, "step", blocked)
    release.set()


def test_a_working_engine_passes_and_its_quiet_probe_runs_a_step(session):
    from llmexport.runtime.serve.metrics import Metrics

    health, metrics = EngineHealth(session.engine), Metrics(session.engine)
    before = session.engine.stats["prefill_calls"]
    tokens = session.engine.stats["generated_tokens"]
    asyncio.run(health.check(probe_timeout_s=30))
    assert session.engine.stats["prefill_calls"] == before + 1
    assert health.problem() is None
    assert metrics.ttft.count == 0 and not metrics.finished  # not a client's request
    assert session.engine.stats["generated_tokens"] == tokens


def test_a_busy_engine_that_finishes_no_iteration_fails(session, hang):
    health = EngineHealth(session.engine, stall_s=0.5)
    time.sleep(0.7)  # idle for longer than stall_s since the last look: not a stall once work arrives
    hang()
    request = session.engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert health.problem() is None  # busy, but only since this check
    time.sleep(0.7)
    assert health.problem().startswith("the engine has not finished an iteration in")
    with pytest.raises(LLMExportError, match="has not finished an iteration"):
        asyncio.run(health.check(probe_timeout_s=30))
    session.engine.cancel(request)


def test_an_idle_engine_whose_probe_hangs_fails_in_time(session, hang):
    health = EngineHealth(session.engine)
    hang()
    started = time.monotonic()
    with pytest.raises(LLMExportError, match="1-token probe request did not finish in 0.5 s"):
        asyncio.run(health.check(probe_timeout_s=0.5))
    assert time.monotonic() - started < 5


def test_a_stopped_engine_thread_fails(session):
    health = EngineHealth(session.engine)
    session.engine.shutdown()
    assert health.problem() == "the engine thread is not running"
    with pytest.raises(LLMExportError, match="engine thread is not running"):
        asyncio.run(health.check(probe_timeout_s=30))


def test_plain_serve_health_answers_503_json_for_a_hung_engine(bundle_factory, monkeypatch):
    from tests.runtime.test_serve import Server

    monkeypatch.setattr("llmexport.runtime.serve.health.STALL_S", 0.5)
    server = Server(bundle_factory("llama3", "ort")[0])
    release = threading.Event()
    step = server.session.engine.backend.step
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        server.session.engine.backend.step = lambda *a, **k: (release.wait(), step(*a, **k))[1]
        request = server.session.engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert httpx.get(server.url + "/health").status_code == 200  # busy for less than stall_s
        time.sleep(0.7)
        answer = httpx.get(server.url + "/health")
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "unhealthy"
        assert "has not finished an iteration" in answer.json()["error"]["message"]
        release.set()
        server.session.engine.wait(lambda: request.done)
        assert httpx.get(server.url + "/health").status_code == 200  # progress again: healthy
    finally:
        release.set()
        server.close()
