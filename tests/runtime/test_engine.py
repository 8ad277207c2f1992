"""The continuous-batching engine without HTTP: requests that join and leave a shared decode batch,
chunked prefill, cancellation, queue limits and backend failures; every request's tokens equal the
same request run alone, on every target and dtype the CPU runs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llmexport import LLMExportError
from llmexport.runtime.engine import Engine, QueueFull
from llmexport.runtime.scheduler import buckets
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session


def _requests(seed: int, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1-20 tokens; greedy and seeded sampling; 1-14 new tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, 256, size=int(rng.integers(1, 21))).tolist()
        sampled = i % 3 == 2
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 15)), ignore_eos=True, seed=i,
                                temperature=0.8 if sampled else 0.0, top_p=0.9 if sampled else 1.0,
                                repetition_penalty=1.3 if sampled else 1.0)
        out.append((prompt, params))
    return out


def _alone(session: Session, work) -> list[list[int]]:
    return [session.generate([prompt], params).token_ids[0] for prompt, params in work]


def _random_arrivals(engine: Engine, work, seed: int) -> list[list[int]]:
    """Submit each request at a random iteration of the engine (driven here, on this thread)."""
    rng = np.random.default_rng(seed)
    arrivals = sorted(rng.integers(0, 12, size=len(work)).tolist())
    requests, iteration = [], 0
    while len(requests) < len(work) or engine.busy:
        while len(requests) < len(work) and arrivals[len(requests)] <= iteration:
            prompt, params = work[len(requests)]
            requests.append(engine.submit(prompt, params))
        if engine.busy:
            engine.step()
        iteration += 1
    assert engine.rows.in_use == 0
    return [r.tokens for r in requests]


@pytest.mark.parametrize("target, dtype", [("ort", "float32"), ("portable", "float32"), ("ort", "float16"),
                                           ("portable", "float16"), ("tensorrt", "float32")])
def test_requests_joining_mid_decode_get_the_tokens_they_get_alone(bundle_factory, target, dtype):
    """12 requests on 4 rows arrive at random iterations: queueing, joins mid-decode, chunked
    prefill (chunk 5 while others decode), batched fresh prefills and bucketed windows."""
    bundle_dir, _ = bundle_factory("llama3", target, dtype)
    work = _requests(0, 12)
    with Session(bundle_dir, prefill_chunk=5) as session:
        alone = _alone(session, work)
        for seed in (1, 2):
            assert _random_arrivals(session.engine, work, seed) == alone, f"arrival order {seed}"


def test_two_streams_interleaved_on_a_portable_bundle_do_not_corrupt_each_other(bundle_factory):
    """Two streams consumed in turn on the same session (this corrupted both when the portable
    backend flipped one global cache set per step)."""
    bundle_dir, _ = bundle_factory("qwen2", "portable")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with Session(bundle_dir) as session:
        alone = [session.generate([p], params).token_ids[0] for p in ([5, 6, 7], [40, 41, 42, 43, 44])]
        a = session.stream([[5, 6, 7]], params)
        first = [next(a).token_id for _ in range(3)]
        b = session.stream([[40, 41, 42, 43, 44]], params)
        got = [[*first], []]
        for ea, eb in zip(a, b):
            got[0].append(ea.token_id)
            got[1].append(eb.token_id)
        got[1] += [e.token_id for e in b]
        assert got == alone


def test_threads_share_one_batch(bundle_factory):
    """Eight threads call generate at once on one session: each gets its own tokens, and the
    engine ran fewer decode steps than the requests one after another would."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    work = _requests(3, 8)
    with Session(bundle_dir) as session:
        alone = _alone(session, work)
        sequential = sum(max(1, len(t) - 1) for t in alone)
        steps = session.engine.stats["decode_steps"]
        results: list = [None] * len(work)

        def run(i):
            results[i] = session.generate([work[i][0]], work[i][1]).token_ids[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == alone
        assert session.engine.stats["decode_steps"] - steps < sequential


def test_a_background_engine_serves_requests_from_threads(bundle_factory):
    bundle_dir, _ = bundle_factory("qwen2", "ort")
    work = _requests(4, 6)
    with Session(bundle_dir) as session:
        alone = _alone(session, work)
        session.engine.start()
        requests = [session.engine.submit(p, params) for p, params in work]
        assert [[e.token_id for e in r] for r in requests] == alone
        assert [r.finish_reason for r in requests] == ["length"] * len(work)


def test_cancel_frees_the_row_at_once_and_the_next_requests_fit(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    with Session(bundle_dir) as session:
        engine = session.engine
        want = session.generate([[9, 10, 11]], SamplingParams(max_new_tokens=5, ignore_eos=True)).token_ids[0]
        running = [engine.submit([5, 6, 7], params) for _ in range(4)]
        engine.step()
        assert engine.rows.in_use == 4
        stream = iter(running[0])
        next(stream)
        stream.close()  # an abandoned iterator cancels its request
        running[1].cancel()
        assert engine.rows.in_use == 2 and running[0].finish_reason == running[1].finish_reason == "cancelled"
        late = [engine.submit([9, 10, 11], SamplingParams(max_new_tokens=5, ignore_eos=True)) for _ in range(2)]
        engine.step()
        assert engine.rows.in_use == 4 and not engine.waiting
        for r in running[2:]:
            r.cancel()
        assert [[e.token_id for e in r if e.token_id is not None] for r in late] == [want, want]
        assert engine.rows.in_use == 0


def test_a_full_queue_refuses_at_once(bundle_factory):
    """max_queue counts the requests that wait beyond the free rows."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir, max_queue=2) as session:
        params = SamplingParams(max_new_tokens=3)
        for _ in range(4 + 2):  # 4 rows free + 2 waiting
            session.engine.submit([5], params)
        with pytest.raises(QueueFull, match="queue is full"):
            session.engine.submit([5], params)
        session.engine.step()  # 4 admitted: 2 wait, no row free
        with pytest.raises(QueueFull):
            session.engine.submit([5], params)
        while session.engine.busy:
            session.engine.step()
        session.engine.submit([5], params)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir) as session:
        engine, real = session.engine, session.backend.step
        want = session.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True)).token_ids[0]

        def broken(phase, *args, **kwargs):
            if phase == "decode":
                raise RuntimeError("device lost")
            return real(phase, *args, **kwargs)

        session.backend.step = broken
        doomed = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True))
        with pytest.raises(LLMExportError, match="decode failed: RuntimeError: device lost"):
            list(doomed)
        assert doomed.finish_reason == "error" and engine.rows.in_use == 0
        session.backend.step = real
        assert session.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True)).token_ids[0] == want


def test_decode_runs_on_bucketed_windows_from_row_zero(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort", max_batch=6)
    assert buckets(6) == [1, 2, 4, 6] and buckets(1) == [1] and buckets(8) == [1, 2, 4, 8]
    with Session(bundle_dir) as session:
        seen, real = set(), session.backend.step

        def recording(phase, ids, positions, lengths, rows, **kwargs):
            if phase == "decode":
                seen.add((rows.start, len(rows)))
            return real(phase, ids, positions, lengths, rows, **kwargs)

        session.backend.step = recording
        _random_arrivals(session.engine, _requests(5, 10), 0)
        assert seen and {start for start, _ in seen} == {0} and {n for _, n in seen} <= {1, 2, 4, 6}


def test_submit_checks_the_prompt(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir) as session:
        for prompt, message in [([], "empty prompt"), ([300], "outside the vocabulary"),
                                (list(range(3, 70)), "exceeds the bundle's max_seq_len=64")]:
            with pytest.raises(LLMExportError, match=message):
                session.engine.submit(prompt, SamplingParams())
        assert not session.engine.busy


def test_asyncio_clients_get_their_alone_tokens(bundle_factory):
    """submit_async from coroutines (the engine on its background thread), one client leaving
    early: the others get their tokens, the early one is cancelled and its row freed."""
    import asyncio

    bundle_dir, _ = bundle_factory("llama3", "ort")
    work = _requests(6, 5)
    with Session(bundle_dir) as session:
        alone = _alone(session, work)
        engine = session.engine
        with pytest.raises(LLMExportError, match="call engine.start"):
            asyncio.run(_collect(engine, work[:1]))
        engine.start()

        async def leave_early():
            request = engine.submit_async([5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True))
            async for _ in request:
                break
            return request

        async def main():
            return await asyncio.gather(_collect(engine, work), leave_early())

        tokens, early = asyncio.run(main())  # leaving run() closes the early loop: it cancels
        assert tokens == alone and early.finish_reason == "cancelled"
        deadline = time.time() + 10
        while engine.rows.in_use:  # freed by the engine thread's current iteration at the latest
            assert time.time() < deadline
            time.sleep(0.01)


def test_a_request_whose_event_loop_closed_does_not_stop_the_engine(bundle_factory):
    """A coroutine client gone with its loop (asyncio.run returned while the engine still holds
    its request, mid-iteration): the engine delivers to nobody and serves the next request."""
    import asyncio

    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Session(bundle_dir) as session:
        engine = session.engine
        want = session.generate([[5, 6, 7]], params).token_ids[0]
        release, step = threading.Event(), engine.backend.step
        engine.backend.step = lambda *a, **k: (release.wait(), step(*a, **k))[1]
        engine.start()

        async def leave():  # submitted, then gone before its first token (the step is held)
            request = engine.submit_async([5, 6, 7], params)
            await asyncio.sleep(0.2)
            return request

        gone = asyncio.run(leave())
        release.set()
        deadline = time.time() + 10
        while not gone.done:
            assert time.time() < deadline
            time.sleep(0.01)
        assert engine.alive and gone.finish_reason == "cancelled"  # nobody to deliver to: its row is freed
        assert asyncio.run(asyncio.wait_for(_collect(engine, [([5, 6, 7], params)]), 30)) == [want]


async def _collect(engine, work):
    import asyncio

    async def one(prompt, params):
        return [e.token_id async for e in engine.submit_async(prompt, params)]

    return list(await asyncio.gather(*(one(p, params) for p, params in work)))


def test_an_internal_error_fails_the_running_requests_and_the_engine_goes_on(bundle_factory):
    """A bug outside the backend call (here: a sampler that raises) must not kill the engine's
    thread and leave every client waiting: the running requests fail with the message, the
    next ones run."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Session(bundle_dir) as session:
        engine = session.engine
        want = session.generate([[5, 6, 7]], params).token_ids[0]
        doomed = engine.submit([5, 6, 7], params)  # nothing steps yet: no thread, no waiter

        def broken(logits):
            raise ValueError("sampler bug")

        doomed.sampler = type("Broken", (), {"__call__": staticmethod(broken), "observe": lambda self, t: None})()
        engine.start()
        with pytest.raises(LLMExportError, match="internal error in the engine: ValueError: sampler bug"):
            list(doomed)
        assert [e.token_id for e in engine.submit([5, 6, 7], params)] == want
        assert engine.rows.in_use == 0
