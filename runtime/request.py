"""One request in the engine: its explicit state, what it has produced, and how its caller reads it.

    WAITING --admitted--> PREFILLING --last prompt token's logits--> DECODING --stops--> FINISHED
       `------ (a cached prefix leaves one token: decoded, not prefilled) ------^

A request prefills `prompt[filled:feed]` in one or more chunks (runtime/scheduler.py plans them),
then decodes one token per step until it stops. A scoring request (`score=True`) only prefills:
it feeds all of its prompt but the last token and records the log-probability of each next
prompt token (perplexity, runtime/evaluate.py). `prompt_logprobs` does the same for a generation
request's prompt before it decodes (OpenAI's `echo` with `logprobs`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from llmexport import LLMExportError

from .logprobs import TokenLogprob, token_logprobs
from .sampling import Sampler, SamplingParams
from .speculation import Acceptance, PromptLookup
from .tokenizer import TextStream

if TYPE_CHECKING:
    from .engine import Engine


class State(enum.Enum):
    WAITING = "waiting"  # queued for a KV row
    PREFILLING = "prefilling"  # holds a row; prompt tokens left to feed
    DECODING = "decoding"  # `pending` is the next token to feed (the last prompt token, or the last sampled)
    FINISHED = "finished"  # finish_reason says why; its row is free


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which prompt of the caller's request (Request.index)
    token_id: int | None  # None on a last event without a token of its own (cancelled, error)
    text: str  # text delta ("" without a tokenizer, or while held back)
    finish_reason: str | None  # set on the last event: eos, stop, length, max_seq_len, cancelled, error
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs


class Request:
    """Iterate it for its TokenEvents (blocks; steps the engine on this thread when no background
    thread runs it), or `async for` it (Engine.submit_async); `cancel()` from any thread."""

    def __init__(self, engine: "Engine", ident: int, prompt: list[int], params: SamplingParams, eos: frozenset,
                 index: int, sink: Callable[[TokenEvent], None] | None, score: bool = False,
                 prompt_logprobs: bool = False, matcher=None, quiet: bool = False):
        self.engine, self.id, self.prompt, self.params, self.index = engine, ident, prompt, params, index
        self.ids = np.asarray(prompt, dtype=np.int64)  # the prompt as an array, for prefix matching
        self.eos, self._sink, self.score = eos, sink, score
        self.state = State.WAITING
        self.row: int | None = None  # the KV row it holds while PREFILLING or DECODING
        self.filled = 0  # slots of its row holding its tokens (a reused prefix included)
        self.reused = 0  # prompt tokens found in the cache instead of computed
        self.feed = len(prompt) - 1 if score else len(prompt)  # prompt tokens to prefill
        self.wants_every_logit = score or prompt_logprobs  # logits at every fed position
        # (token, log-probability, top) of prompt tokens 1.. (score / prompt_logprobs)
        self.prompt_logprobs: list[TokenLogprob] = []
        self.pending: int | None = None
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.quiet = quiet  # not a client's request (Engine.submit's quiet): listeners skip it
        self.matcher = matcher  # runtime/grammar.py Matcher: the tokens its grammar allows next
        speculation = engine.speculation
        self.lookup = (PromptLookup(speculation, prompt) if speculation is not None and speculation.method == "ngram"
                       and not score else None)
        self.acceptance = Acceptance()
        self.sampler = Sampler(params, prompt, mask=matcher.mask_logits if matcher is not None else None)
        self.text = TextStream(engine.tokenizer, params.stop)
        self.events: deque[TokenEvent] = deque()
        self._queue: asyncio.Queue | None = None  # submit_async's
        self.submitted_at = time.perf_counter()
        self.token_times: list[float] = []

    @property
    def done(self) -> bool:
        return self.state is State.FINISHED

    @property
    def decoding(self) -> bool:
        return self.state is State.DECODING

    @property
    def prefilling(self) -> bool:
        return self.state is State.PREFILLING

    def cancel(self) -> None:
        """Stop generating; the row is freed now, or at the end of the iteration under way. The
        last event has finish_reason "cancelled"."""
        self.engine.cancel(self)

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
                batch, finished = self.engine.take_events(self)
                yield from batch
                if finished:
                    if self.finish_reason == "error":
                        raise LLMExportError(self.error)
                    return
        finally:
            if not self.done:
                self.cancel()

    def sample(self, logits):
        """The next token from this request's logits (V,) (its grammar's mask, penalties and
        bias applied by its sampler), and its log-probability when asked for."""
        token = self.sampler(logits)
        if self.matcher is not None:
            self.matcher.accept(token)
        logprob = None
        if self.params.logprobs is not None:
            logprob = token_logprobs(logits[None], (token,), self.params.logprobs)[0]
        return token, logprob

    def record(self, token: int, logprob: TokenLogprob | None, max_seq_len: int) -> tuple[str, str | None]:
        """Keep a sampled token (the next decode input): its text delta, and why the request stops
        here (eos, stop, length, max_seq_len) or None."""
        if logprob is not None:
            self.logprobs.append(logprob)
        self.sampler.generated(token)
        if self.lookup is not None:
            self.lookup.extend((token,))
        self.tokens.append(token)
        self.token_times.append(time.perf_counter())
        self.state, self.pending = State.DECODING, token
        text = self.text.push(token)
        if token in self.eos:
            reason = "eos"
        elif self.text.stopped:
            reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            reason = "length"
        elif self.filled >= max_seq_len:  # no cache slot left to decode this token into
            reason = "max_seq_len"
        else:
            return text, None
        return text + self.text.flush(), reason

    def deliver(self, event: TokenEvent) -> None:
        """Under the engine's lock: to the sink, else to the request's own queue. A sink that fails
        (an asyncio client whose event loop has closed) has nobody behind it: the request is
        cancelled (the engine frees its row) and the engine thread goes on."""
        if self._sink is None:
            self.events.append(event)
            return
        try:
            self._sink(event)
        except Exception:  # noqa: BLE001
            self._sink, self.cancelled = None, True
