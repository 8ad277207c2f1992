"""The one generation loop: continuous batching over one backend's KV rows.

Requests (runtime/request.py) are submitted from any thread. Each iteration of the engine:

1. finishes cancelled requests (their rows are free at once), then lets the scheduler
   (runtime/scheduler.py) admit waiting requests into rows: KVRows (runtime/kv_rows.py) picks a
   row that already holds the start of the prompt where it can, or copies that prefix from
   another row (`backend.copy_row`);
2. prefills the chunks the scheduler plans (all prompts with nothing decoding; about one decode
   step's worth while others decode, runtime/prefill_budget.py);
3. runs one decode step for every decoding request together over the rows 0..W-1 of the
   scheduler's window. Rows inside the window that are not decoding (free, or part-way through
   a prompt) compute a dummy token written at their spare slot (the one after the tokens their
   cache holds), so nothing is corrupted. Decode reads the weights once per step whatever the
   batch, so an idle row costs a fraction of a busy one; a gather/scatter of rows into a dense
   batch would copy every layer's cache each step instead;
4. samples, stops and streams per request; a finished request frees its row, which keeps its
   tokens for prompt reuse.

Nothing outside the engine touches a row: scoring (`score=True` requests, runtime/evaluate.py)
runs through the same iterations as generation.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from llmexport import LLMExportError
from llmexport.runtime.bundle import names as io

from . import defaults
from .kv_rows import KVRows, Lease
from .logprobs import token_logprobs
from .prefill_budget import PrefillBudget
from .request import Request, State, TokenEvent, TokenLogprob
from .sampling import SamplingParams
from .scheduler import Chunk, Scheduler
from .speculation import DraftModel, SpeculationConfig, SpeculationCost
from .tokenizer import Tokenizer

__all__ = ["Engine", "QueueFull", "Request", "State", "TokenEvent", "TokenLogprob"]


class QueueFull(LLMExportError):
    """The engine's waiting queue is at its limit (a server answers 429)."""


class Engine:
    """Owns `backend` and every KV row it allocated; the only generation loop in llmexport."""

    def __init__(self, backend, tokenizer: Tokenizer | None = None, *, eos_token_ids: Sequence[int] = (),
                 max_queue: int | None = None, prefill_chunk: int = defaults.PREFILL_CHUNK,
                 prefill_stall: float = defaults.PREFILL_STALL, prompt_reuse: bool = defaults.PROMPT_REUSE,
                 speculation: SpeculationConfig | None = None, drafter: DraftModel | None = None):
        """max_queue: requests that may wait for a row (beyond the free rows) before submit raises
        QueueFull (None: no limit; 0: only what the free rows take).
        prefill_chunk: at most this many prompt tokens are prefilled per iteration while other
        requests decode; prefill_stall: and about as many as take this many decode steps' time
        (runtime/prefill_budget.py). prompt_reuse: see runtime/kv_rows.py. speculation: propose
        tokens and verify them in one call where that is faster (runtime/speculation.py); drafter: the
        draft model that proposes them when speculation.method is "draft"."""
        if prefill_chunk < 1:
            raise LLMExportError(f"prefill_chunk={prefill_chunk} must be at least 1")
        self.backend, self.tokenizer = backend, tokenizer
        self.bundle = backend.bundle
        self.max_seq_len = self.bundle.max_seq_len
        self.vocab_size = self.bundle.vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_queue = max_queue
        self.prefill_budget = PrefillBudget(prefill_chunk, prefill_stall)
        self.rows = KVRows(backend.cache_rows, self.max_seq_len, prompt_reuse)
        self.scheduler = Scheduler(self.rows, self.vocab_size)
        self.speculation = speculation
        self.drafter = drafter
        self.speculation_cost = SpeculationCost()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # by row, in admission order
        self._ids = itertools.count()
        self._cond = threading.Condition(threading.RLock())
        self._stepping = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"decode_steps": 0, "prefill_calls": 0, "generated_tokens": 0,
                      # prompt tokens of admitted requests: found in a row's cache, or computed
                      "prompt_tokens": 0, "reused_prompt_tokens": 0, "row_copies": 0,
                      # speculative decoding: verification calls, tokens proposed and accepted
                      "speculative_calls": 0, "proposed_tokens": 0, "accepted_tokens": 0,
                      # iterations that only decoded: their wall time and the part inside the compute
                      # library (backend.run_s); the rest is host work (binding, sampling, streaming)
                      "decode_iterations": 0, "decode_iteration_s": 0.0, "decode_run_s": 0.0}
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
               sink: Callable[[TokenEvent], None] | None = None, score: bool = False,
               prompt_logprobs: bool = False, matcher=None, quiet: bool = False) -> Request:
        """Queue one prompt (token ids). Events go to `sink` (called on the engine's thread, under
        its lock: keep it short) or, without one, to the request's own queue (iterate it).
        score: only score the prompt (Request.prompt_logprobs; finish reason "scored").
        prompt_logprobs: also record the prompt's log-probabilities before generating.
        matcher: a runtime/grammar.py Matcher; each token is sampled among those it allows.
        quiet: not a client's request (a health probe): listeners (metrics) do not hear of it."""
        prompt = self.check_prompt(prompt)
        if score and len(prompt) < 2:
            raise LLMExportError("scoring needs at least 2 tokens (the first is never predicted)")
        eos = frozenset() if params.ignore_eos else (frozenset(params.eos_token_ids)
                                                     if params.eos_token_ids is not None else self.eos_token_ids)
        with self._cond:
            if self._stop:
                raise LLMExportError("the engine is shut down")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue + self.rows.free_rows:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for one of "
                                f"{self.rows.rows} KV rows); retry later")
            request = Request(self, next(self._ids), prompt, params, eos, index, sink, score, prompt_logprobs,
                              matcher, quiet)
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    def submit_async(self, prompt: Sequence[int], params: SamplingParams, *, index: int = 0,
                     prompt_logprobs: bool = False, matcher=None, quiet: bool = False) -> Request:
        """submit() from a coroutine: `async for event in request`, or `await request.next_event()`.
        The engine must iterate on its background thread (start())."""
        if self._thread is None:
            raise LLMExportError("asyncio clients need the engine on its background thread: call engine.start()")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = self.submit(prompt, params, index=index, prompt_logprobs=prompt_logprobs, matcher=matcher,
                              sink=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e), quiet=quiet)
        request._queue = queue
        return request

    def cancel(self, request: Request) -> None:
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

    def take_events(self, request: Request) -> tuple[list[TokenEvent], bool]:
        """The events `request` has queued (waiting, and stepping the engine meanwhile, until
        there is one or it is done), and whether it is finished with all of them taken."""
        self.wait(lambda: request.events or request.done)
        with self._cond:
            batch = list(request.events)
            request.events.clear()
            return batch, request.done and not request.events

    # -- driving ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def alive(self) -> bool:
        """Whether the background thread (start()) is running; a server's health check asks."""
        thread = self._thread
        return thread is not None and thread.is_alive()

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
        started, ran, calls = time.perf_counter(), self.backend.run_s, self.stats["prefill_calls"]
        try:
            self._iteration()
            if self.stats["prefill_calls"] == calls and self.backend.run_s != ran:
                self.stats["decode_iterations"] += 1
                self.stats["decode_iteration_s"] += time.perf_counter() - started
                self.stats["decode_run_s"] += self.backend.run_s - ran
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
            admitted = len(self.running)
            copies = self.scheduler.admit(self.waiting, self.running)
            for request in list(self.running.values())[admitted:]:
                if not request.quiet:  # a health probe is not a client's work (the metrics read these)
                    self.stats["prompt_tokens"] += len(request.prompt)
                    self.stats["reused_prompt_tokens"] += request.reused
            running = list(self.running.values())
        for lease in copies:
            self._copy(lease)
        decoding_now = any(r.decoding for r in running)
        budget = self.prefill_budget.tokens() if decoding_now else None
        for group in self.scheduler.prefill(running, budget):
            self._run_prefill(group)
        decoding = [r for r in self.running.values() if r.decoding]
        if decoding and self.speculation is not None:
            self._decode_or_verify(decoding)
        elif decoding:
            self._decode(decoding)
        with self._cond:  # cancelled during this iteration: free the rows before the next
            self._reap()

    def _reap(self) -> None:
        """Under the lock: finish the running requests marked cancelled (by a cancel during an
        iteration, or by shutdown) and free their rows."""
        for request in [r for r in self.running.values() if r.cancelled]:
            self._finish(request, "cancelled")

    def _copy(self, lease: Lease) -> None:
        """Copy a shared prefix into a new request's row; if the backend cannot, compute it."""
        request = self.running[lease.row]
        try:
            self.backend.copy_row(lease.copy_from, lease.row, lease.cached)
            self.stats["row_copies"] += 1
        except Exception:  # noqa: BLE001  (a backend without copies, or a failed one: recompute instead)
            self.rows.wrote(lease.row, 0, ())
            if not request.quiet:
                self.stats["reused_prompt_tokens"] -= request.reused
            request.filled = request.reused = 0
            request.state, request.pending = State.PREFILLING, None

    def _run_prefill(self, group: list[Chunk]) -> None:
        width = max(c.length for c in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        positions = np.zeros((len(group), width), dtype=np.int64)
        lengths = np.zeros(len(group), dtype=np.int64)
        for i, c in enumerate(group):
            ids[i, : c.length] = c.request.prompt[c.start: c.start + c.length]
            # padding takes the slots after the row's real tokens: the row overwrites them later
            positions[i] = np.arange(c.start, c.start + width)
            lengths[i] = c.start + c.length
        every = group[0].request.wants_every_logit
        logits_at = np.tile(np.arange(width, dtype=np.int64), (len(group), 1)) if every else None
        rows = range(group[0].request.row, group[-1].request.row + 1)
        started = time.perf_counter()
        logits = self._call([c.request for c in group], io.PREFILL, ids, positions, lengths, rows, logits_at)
        if logits is None:
            return
        self.prefill_budget.prefilled(ids.size, time.perf_counter() - started)
        self.stats["prefill_calls"] += 1
        for i, c in enumerate(group):
            r = c.request
            self.rows.wrote(r.row, c.start, ids[i, : c.length])
            r.filled += c.length
            if every:
                self._score(r, c, logits[i])
            if r.filled < r.feed:
                continue
            if r.score:
                with self._cond:
                    self._finish(r, "scored")
            else:
                self._sampled(r, logits[i, c.length - 1] if every else logits[i])
        if every:
            with self._cond:  # scoring progress
                self._cond.notify_all()

    def _score(self, request: Request, chunk: Chunk, logits: np.ndarray) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict."""
        n = min(chunk.length, len(request.prompt) - 1 - chunk.start)
        if n > 0:
            targets = request.prompt[chunk.start + 1: chunk.start + 1 + n]
            top = request.params.logprobs or 0
            request.prompt_logprobs.extend(token_logprobs(logits[:n], targets, top))

    def _decode(self, decoding: list[Request]) -> None:
        window = self.scheduler.decode_window(decoding)
        ids = np.zeros((window, 1), dtype=np.int64)
        positions = np.zeros((window, 1), dtype=np.int64)
        stepping = {r.row: r for r in decoding}
        for row in range(window):
            request = stepping.get(row)
            if request is not None:
                positions[row, 0], ids[row, 0] = request.filled, request.pending
            else:  # idle: a dummy token at a slot nothing reads
                positions[row, 0] = self.rows.spare_slot(row)
        started = time.perf_counter()
        logits = self._call(decoding, io.DECODE, ids, positions, positions[:, 0] + 1, range(window))
        if logits is None:
            return
        took = time.perf_counter() - started
        self.prefill_budget.decoded(took)
        if self.speculation is not None:
            self.speculation_cost.decoded(window, took)
        self.stats["decode_steps"] += 1
        for r in decoding:
            self.rows.wrote(r.row, r.filled, (r.pending,))
            r.filled += 1
            self._sampled(r, logits[r.row])

    def _decode_or_verify(self, decoding: list[Request]) -> None:
        """Verify each row that has proposals in a call of its own, or decode every row in one
        step, whichever the measured costs say gives more tokens per second
        (runtime/speculation.py). Prompt lookup proposes before the choice (it is free and may
        find nothing); a draft model proposes after it (it costs k draft steps)."""
        budget = {r.row: min(self.speculation.tokens, r.params.max_new_tokens - len(r.tokens) - 1,
                             self.max_seq_len - r.filled - 1) for r in decoding}
        proposals = {}
        if self.drafter is None:
            for r in decoding:
                found = r.lookup.propose(budget[r.row]) if budget[r.row] >= 1 and r.lookup is not None else []
                if found:
                    proposals[r.row] = found
            planned = {row: len(p) for row, p in proposals.items()}
        else:
            planned = {row: k for row, k in budget.items() if k >= 1}
        idle = [r for r in decoding if r.row not in planned]
        window = self.scheduler.decode_window(decoding)
        if not planned or not self.speculation_cost.worth_it(
                window, [(self.running[row].acceptance.rate, k) for row, k in planned.items()],
                len(idle), self.scheduler.decode_window(idle) if idle else 0):
            self._decode(decoding)
            return
        for row, k in planned.items():
            request, drafted = self.running[row], 0.0
            if self.drafter is not None:
                started = time.perf_counter()
                try:
                    proposals[row] = self.drafter.propose(row, request.prompt + request.tokens, k)
                except Exception as e:  # noqa: BLE001  (a failing draft fails its request, not the engine)
                    with self._cond:
                        request.error = f"the draft model failed: {e}"
                        self._finish(request, "error")
                    continue
                drafted = time.perf_counter() - started
            if proposals.get(row):
                self._verify(request, proposals[row], drafted)
            else:
                idle.append(request)
        if idle:
            self._decode(sorted(idle, key=lambda r: r.row))

    def _verify(self, request: Request, proposed: list[int], drafted: float = 0.0) -> None:
        """Feed the pending token and the proposals in one call, then sample position by position
        while the sampled token equals the proposal; the row keeps only the fed tokens that were
        kept (the rest lie past its length, unread until overwritten). drafted: the seconds the
        proposals cost (a draft model's steps), counted with the verification's."""
        start, fed = request.filled, [request.pending, *proposed]
        n = len(fed)
        started = time.perf_counter()
        logits = self._call([request], io.PREFILL, np.array([fed], dtype=np.int64),
                            np.arange(start, start + n, dtype=np.int64)[None], np.array([start + n]),
                            range(request.row, request.row + 1), np.arange(n, dtype=np.int64)[None])
        if logits is None:
            return
        self.speculation_cost.verified(n, time.perf_counter() - started + drafted)
        accepted = 0
        for i in range(n):
            request.filled = start + i + 1  # fed[0..i] are this row's tokens now
            self.rows.wrote(request.row, start, fed[: i + 1])
            self._sampled(request, logits[0, i])
            if request.done or i == n - 1 or request.pending != proposed[i]:
                break
            accepted += 1
        request.acceptance.update(len(proposed), accepted)
        self.stats["speculative_calls"] += 1
        self.stats["proposed_tokens"] += len(proposed)
        self.stats["accepted_tokens"] += accepted

    def _call(self, requests, phase, ids, positions, lengths, rows, logits_at=None):
        """backend.step; a failure finishes `requests` with the error and leaves the engine running."""
        try:  # copy=False: sampled before the next step
            return self.backend.step(phase, ids, positions, lengths, rows, copy=False, logits_at=logits_at)
        except Exception as e:  # noqa: BLE001  (a server must outlive any backend failure)
            message = str(e) if isinstance(e, LLMExportError) else f"{phase} failed: {type(e).__name__}: {e}"
            with self._cond:
                for r in requests:
                    r.error = message
                    self._finish(r, "error")
            return None

    def _sampled(self, request: Request, logits: np.ndarray) -> None:
        """Sample one request's next token from its logits (V,), then record and stream it."""
        try:
            token, logprob = request.sample(logits)
        except LLMExportError as e:  # the grammar and the model disagree: this request fails, not the batch
            with self._cond:
                request.error = str(e)
                self._finish(request, "error")
            return
        text, reason = request.record(token, logprob, self.max_seq_len)
        with self._cond:
            if not request.quiet:
                self.stats["generated_tokens"] += 1
            self._notify("first_token" if len(request.tokens) == 1 else "token", request)
            self._deliver(request, TokenEvent(request.index, token, text, reason, logprob))
            if reason:
                self._finish(request, reason, event=False)

    def _finish(self, request: Request, reason: str, event: bool = True) -> None:
        """Under the lock: mark done, free the row (it keeps its tokens unless the request
        failed), tell listeners (and the client, for reasons without a token of their own:
        scored, cancelled, error)."""
        request.state, request.finish_reason = State.FINISHED, reason
        if request.row is not None and self.running.get(request.row) is request:
            del self.running[request.row]
            self.rows.free(request.row, keep=reason != "error")
        self._notify("finish", request)
        if event:
            self._deliver(request, TokenEvent(request.index, None, request.text.flush(), reason))
        self._cond.notify_all()

    def _notify(self, kind: str, request: Request) -> None:
        """Under the lock: tell the listeners (metrics), unless the request is quiet (a health probe)."""
        if not request.quiet:
            for listener in self.listeners:
                listener(kind, request)

    def _deliver(self, request: Request, event: TokenEvent) -> None:
        request.deliver(event)
        self._cond.notify_all()
