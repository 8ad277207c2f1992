"""The one generation loop: continuous batching over one backend's KV rows.

Requests are submitted from any thread; each owns one KV row while it runs, samples with its
own parameters and streams TokenEvents. Each iteration of the engine:

1. drops cancelled requests (their rows are free at once) and admits waiting requests into
   free rows, lowest row first;
2. prefills with a token budget: new prompts that fit whole go in one right-padded batch when
   their rows are adjacent (a fresh prompt needs no cache, which every target batches); while
   other requests are decoding, a prompt longer than the budget is prefilled in chunks over
   several iterations, one prefill call per iteration. The budget is set by time: about one
   decode step's worth of prefill, at most `prefill_chunk` tokens (prefill_budget.py). A chunk
   after the first runs alone: ONNX Runtime's GroupQueryAttention takes S > 1 over a
   non-empty cache at batch 1 only;
3. runs one decode step for every decoding request together, over the rows 0..W-1, where W is
   the smallest bucket (1, 2, 4, 8, ..., the row count) holding the highest busy row, so a
   graph-capturing backend sees a few shapes;
4. samples, stops and streams per request; a finished request frees its row.

Cache layout: rows stay where they are (one row per request, no paging, no copies). A decode
step binds the whole window 0..W-1 by pointer, and the rows inside it that are not decoding
(free, or part-way through a chunked prompt) compute a dummy token written at the next slot
they would fill anyway, so nothing is corrupted. The cost is compute for the idle rows of the
window; decode reads the weights once per step whatever the batch, so an idle row costs a
fraction of a busy one, and lowest-first allocation keeps the window tight. A gather/scatter of
rows into a dense batch would copy every layer's cache each step instead.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError
from llmexport.runtime.bundle import names as io

from .backend import Backend
from .kv_slots import KVSlots
from .prefill_budget import PrefillBudget
from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer


class QueueFull(LLMExportError):
    """The engine's waiting queue is at its limit (a server answers 429)."""


@dataclass(frozen=True)
class TokenEvent:
    row: int  # which prompt of the caller's request (Request.index)
    token_id: int | None  # None on a last event without a token of its own (cancelled, error)
    text: str  # text delta ("" without a tokenizer, or while held back)
    finish_reason: str | None  # set on the last event: eos, stop, length, max_seq_len, cancelled, error


def buckets(rows: int) -> list[int]:
    """Decode batch shapes: powers of two below `rows`, then `rows`."""
    return sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows})


def _whole(request: "Request") -> bool:
    """A fresh prompt prefilled at once: it needs no cache, so it batches with its neighbours."""
    return request.filled == 0 and request.chunk == len(request.prompt)


class Request:
    """One prompt in the engine. Iterate it for its TokenEvents (blocks; steps the engine on
    this thread when no background thread runs it); `cancel()` from any thread."""

    def __init__(self, engine: "Engine", ident: int, prompt: list[int], params: SamplingParams, eos: frozenset,
                 index: int, sink: Callable[[TokenEvent], None] | None):
        self.engine, self.id, self.prompt, self.params, self.index = engine, ident, prompt, params, index
        self.eos, self._sink = eos, sink
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.row: int | None = None
        self.filled = 0  # cache slots of this row holding this request's tokens
        self.chunk = 0  # prompt tokens this iteration prefills
        self.pending: int | None = None  # sampled, not yet in the cache: the next decode input
        self.cancelled = False
        self.sampler = Sampler(params, prompt)
        self.text = TextStream(engine.tokenizer, params.stop)
        self.events: deque[TokenEvent] = deque()
        self._queue: asyncio.Queue | None = None  # submit_async's
        self.submitted_at = time.perf_counter()
        self.token_times: list[float] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.pending is not None and not self.done

    def cancel(self) -> None:
        """Stop generating; the row is freed now, or at the end of the iteration under way. The
        last event has finish_reason "cancelled"."""
        self.engine._cancel(self)

    async def next_event(self) -> TokenEvent:
        """The next event of a request made by Engine.submit_async (awaits the engine's thread)."""
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """`async for event in request` (submit_async); leaving the loop early cancels the request."""
        try:
            while True:
                event = await self.next_event()
                if event.finish_reason == "error":
                    raise LLMExportError(self.error)
                yield event
                if event.finish_reason:
                    return
        finally:
            if not self.done:
                self.cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                self.engine.wait(lambda: self.events or self.done)
                with self.engine._cond:
                    batch = list(self.events)
                    self.events.clear()
                    finished = self.done and not self.events
                yield from batch
                if finished:
                    if self.finish_reason == "error":
                        raise LLMExportError(self.error)
                    return
        finally:
            if not self.done:
                self.cancel()


class Engine:
    """Owns `backend` and every KV row it allocated; the only generation loop in llmexport."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None, *, eos_token_ids: Sequence[int] = (),
                 max_queue: int | None = None, prefill_chunk: int = 256, prefill_stall: float = 1.0):
        """max_queue: requests that may wait for a row (beyond the free rows) before submit raises
        QueueFull (None: no limit; 0: only what the free rows take).
        prefill_chunk: at most this many prompt tokens are prefilled per iteration while other
        requests decode; prefill_stall: and about as many as take this many decode steps' time
        (runtime/prefill_budget.py)."""
        if prefill_chunk < 1:
            raise LLMExportError(f"prefill_chunk={prefill_chunk} must be at least 1")
        self.backend, self.tokenizer = backend, tokenizer
        self.bundle = backend.bundle
        self.max_seq_len = self.bundle.max_seq_len
        self.vocab_size = self.bundle.vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_queue = max_queue
        self.prefill_budget = PrefillBudget(prefill_chunk, prefill_stall)
        self.slots = KVSlots(backend.cache_rows)
        self.buckets = buckets(backend.cache_rows)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # by row, in admission order
        self._ids = itertools.count()
        self._cond = threading.Condition(threading.RLock())
        self._stepping = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"decode_steps": 0, "prefill_calls": 0, "generated_tokens": 0,
                      # iterations that only decoded: their wall time and the part inside the compute
                      # library (backend.graph_s); the rest is host work (binding, sampling, streaming)
                      "decode_iterations": 0, "decode_iteration_s": 0.0, "decode_graph_s": 0.0}
        self.listeners: list[Callable[[str, Request], None]] = []  # ("first_token"|"token"|"finish", request)

    # -- submitting ---------------------------------------------------------------------------

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt]
        if not ids:
            raise LLMExportError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise LLMExportError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if len(ids) > self.max_seq_len:
            raise LLMExportError(f"prompt of {len(ids)} tokens exceeds the bundle's max_seq_len={self.max_seq_len}; "
                                 f"shorten it or re-export with a larger --max-seq-len")
        return ids

    def submit(self, prompt: Sequence[int], params: SamplingParams, *, index: int = 0,
               sink: Callable[[TokenEvent], None] | None = None) -> Request:
        """Queue one prompt (token ids). Events go to `sink` (called on the engine's thread, under
        its lock: keep it short) or, without one, to the request's own queue (iterate it)."""
        prompt = self.check_prompt(prompt)
        eos = frozenset() if params.ignore_eos else (frozenset(params.eos_token_ids)
                                                     if params.eos_token_ids is not None else self.eos_token_ids)
        with self._cond:
            if self._stop:
                raise LLMExportError("the engine is shut down")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue + self.slots.free_rows:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for one of "
                                f"{self.slots.rows} KV rows); retry later")
            request = Request(self, next(self._ids), prompt, params, eos, index, sink)
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    def submit_async(self, prompt: Sequence[int], params: SamplingParams, *, index: int = 0) -> Request:
        """submit() from a coroutine: `async for event in request`, or `await request.next_event()`.
        The engine must iterate on its background thread (start())."""
        if self._thread is None:
            raise LLMExportError("asyncio clients need the engine on its background thread: call engine.start()")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = self.submit(prompt, params, index=index,
                              sink=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        request._queue = queue
        return request

    def _cancel(self, request: Request) -> None:
        with self._cond:
            if request.done:
                return
            request.cancelled = True
            if request in self.waiting:  # never started: finish it now
                self.waiting.remove(request)
                self._finish(request, "cancelled")
            elif not self._stepping:  # between iterations: free its row now
                self._finish(request, "cancelled")
            self._cond.notify_all()

    # -- driving ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def wait(self, ready: Callable[[], object]) -> None:
        """Return once `ready()` is true. Without a background thread the caller's thread runs
        engine iterations meanwhile (one thread at a time; the others wait for its events)."""
        while True:
            with self._cond:
                if ready():
                    return
                if self._thread is not None or self._stepping:
                    self._cond.wait(0.5)
                    continue
                if not self.busy:
                    raise LLMExportError("internal error: waiting on an engine with nothing to run")
            self.step()

    def start(self) -> None:
        """Run iterations on a background thread (servers); callers then only wait for events."""
        with self._cond:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="llmexport-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.busy:
                    self._cond.wait()
                if self._stop and not self.busy:
                    return
            self.step()

    def shutdown(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; cancel the rest (or let them finish), then stop the thread."""
        with self._cond:
            self._stop = True
            if cancel:
                for request in list(self.waiting) + list(self.running.values()):
                    request.cancelled = True
                for request in list(self.waiting):
                    self.waiting.remove(request)
                    self._finish(request, "cancelled")
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            self._thread = None

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration on the calling thread (after any other thread's current one)."""
        with self._cond:
            while self._stepping:
                self._cond.wait()
            self._stepping = True
        started, graph, calls = time.perf_counter(), self.backend.graph_s, self.stats["prefill_calls"]
        try:
            self._iteration()
            if self.stats["prefill_calls"] == calls and self.backend.graph_s != graph:
                self.stats["decode_iterations"] += 1
                self.stats["decode_iteration_s"] += time.perf_counter() - started
                self.stats["decode_graph_s"] += self.backend.graph_s - graph
        except Exception as e:  # noqa: BLE001  (a bug outside the backend call: fail what runs, keep the engine)
            with self._cond:
                for request in list(self.running.values()):
                    request.error = f"internal error in the engine: {type(e).__name__}: {e}"
                    self._finish(request, "error")
        finally:
            with self._cond:
                self._stepping = False
                self._cond.notify_all()

    def _iteration(self) -> None:
        """Reap, admit, prefill within the budget, one decode step for every decoding request."""
        with self._cond:
            self._reap()
            while self.waiting and (row := self.slots.take()) is not None:
                request = self.waiting.popleft()
                request.row = row
                self.running[row] = request
            prefilling = [r for r in self.running.values() if r.pending is None and not r.done]
            decoding_now = any(r.decoding for r in self.running.values())
        self._prefill(prefilling, self.prefill_budget.tokens() if decoding_now else None)
        decoding = [r for r in self.running.values() if r.decoding]
        if decoding:
            self._decode(decoding)
        with self._cond:  # cancelled during this iteration: free the rows before the next
            self._reap()

    def _reap(self) -> None:
        """Under the lock: finish the running requests marked cancelled (by a cancel during an
        iteration, or by shutdown) and free their rows."""
        for request in [r for r in self.running.values() if r.cancelled]:
            self._finish(request, "cancelled")

    def _prefill(self, requests: list[Request], budget: int | None) -> None:
        """Prefill `requests` in admission order: all of them whole (budget None: nothing is
        decoding), or within `budget` tokens in one call (others are decoding: every call reads
        all the weights, so a second call would cost them a second stall)."""
        groups: list[list[Request]] = []
        for request in requests:
            if budget is not None and budget <= 0:
                break
            left = len(request.prompt) - request.filled
            chunk = left if budget is None else min(left, budget)
            last = groups[-1][-1] if groups else None
            joins = (last is not None and _whole(last) and request.filled == 0 and chunk == left
                     and last.row + 1 == request.row)
            if budget is not None and groups and not joins:
                break
            request.chunk = chunk
            if budget is not None:
                budget -= chunk
            if joins:
                groups[-1].append(request)
            else:
                groups.append([request])
        for group in groups:
            self._run_prefill(group)

    def _run_prefill(self, group: list[Request]) -> None:
        width = max(r.chunk for r in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        positions = np.zeros((len(group), width), dtype=np.int64)
        lengths = np.zeros(len(group), dtype=np.int64)
        for i, r in enumerate(group):
            ids[i, : r.chunk] = r.prompt[r.filled: r.filled + r.chunk]
            # padding takes the slots after the row's real tokens: the row overwrites them later
            positions[i] = np.arange(r.filled, r.filled + width)
            lengths[i] = r.filled + r.chunk
        rows = range(group[0].row, group[-1].row + 1)
        started = time.perf_counter()
        logits = self._call(group, io.PREFILL, ids, positions, lengths, rows)
        if logits is None:
            return
        self.prefill_budget.prefilled(ids.size, time.perf_counter() - started)
        self.stats["prefill_calls"] += 1
        for i, r in enumerate(group):
            r.filled += r.chunk
            if r.filled == len(r.prompt):
                self._sampled(r, r.sampler(logits[i]))

    def _decode(self, decoding: list[Request]) -> None:
        top = max(r.row for r in decoding)
        window = next(b for b in self.buckets if b > top)
        ids = np.zeros((window, 1), dtype=np.int64)
        positions = np.zeros((window, 1), dtype=np.int64)
        for row in range(window):  # idle rows: a dummy token at the next slot they would fill anyway
            request = self.running.get(row)
            if request is not None and not request.done:
                positions[row, 0] = request.filled
                if request.decoding:
                    ids[row, 0] = request.pending
        started = time.perf_counter()
        logits = self._call(decoding, io.DECODE, ids, positions, positions[:, 0] + 1, range(window))
        if logits is None:
            return
        self.prefill_budget.decoded(time.perf_counter() - started)
        self.stats["decode_steps"] += 1
        for r in decoding:
            r.filled += 1
            self._sampled(r, r.sampler(logits[r.row]))

    def _call(self, requests, phase, ids, positions, lengths, rows):
        """backend.step; a failure finishes `requests` with the error and leaves the engine running."""
        try:
            return self.backend.step(phase, ids, positions, lengths, rows, copy=False)  # sampled before the next step
        except Exception as e:  # noqa: BLE001  (a server must outlive any backend failure)
            message = str(e) if isinstance(e, LLMExportError) else f"{phase} failed: {type(e).__name__}: {e}"
            with self._cond:
                for r in requests:
                    r.error = message
                    self._finish(r, "error")
            return None

    def _sampled(self, request: Request, token: int) -> None:
        """Record, stop and stream one request's sampled token."""
        request.sampler.observe((token,))
        request.tokens.append(token)
        request.token_times.append(time.perf_counter())
        text = request.text.push(token)
        if token in request.eos:
            reason = "eos"
        elif request.text.stopped:
            reason = "stop"
        elif len(request.tokens) >= request.params.max_new_tokens:
            reason = "length"
        elif request.filled >= self.max_seq_len:  # no cache slot left to decode this token into
            reason = "max_seq_len"
        else:
            reason = None
        if reason:
            text += request.text.flush()
        with self._cond:
            self.stats["generated_tokens"] += 1
            request.pending = token
            for listener in self.listeners:
                listener("first_token" if len(request.tokens) == 1 else "token", request)
            self._deliver(request, TokenEvent(request.index, token, text, reason))
            if reason:
                self._finish(request, reason, event=False)

    def _finish(self, request: Request, reason: str, event: bool = True) -> None:
        """Under the lock: mark done, free the row, tell listeners (and the client, for reasons
        without a token of their own: cancelled, error)."""
        request.finish_reason = reason
        if request.row is not None and self.running.get(request.row) is request:
            del self.running[request.row]
            self.slots.free(request.row)
        for listener in self.listeners:
            listener("finish", request)
        if event:
            self._deliver(request, TokenEvent(request.index, None, request.text.flush(), reason))
        self._cond.notify_all()

    def _deliver(self, request: Request, event: TokenEvent) -> None:
        if request._sink is not None:
            request._sink(event)
        else:
            request.events.append(event)
        self._cond.notify_all()
