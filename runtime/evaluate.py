"""`perplexity`: how well a bundle predicts a text, on any backend, dtype or quantization.

The text's token ids are cut into consecutive windows of `window` tokens (at most the bundle's
max_seq_len); within each window every token after the first is predicted from the ones before
it, and the windows do not overlap (what transformers' perplexity guide calls a stride equal
to the window). perplexity = exp(mean negative log-likelihood over every predicted token).

Each window is a scoring request of the session's engine (`Engine.submit(score=True)`), scored
in prefill calls that return the logits of every position (`Backend.step(logits_at=...)`): a
call reads the weights once for as many tokens as its logits may take memory for
(scheduler.LOGITS_BYTES), where feeding a window one token per step read them once per token.
Windows short enough run side by side in one call; a longer window runs in chunks over its
growing cache (runtime/scheduler.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmexport import LLMExportError

from .sampling import SamplingParams

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    window: int
    seconds: float


def windows(ids: list[int], window: int) -> list[list[int]]:
    """The text's consecutive, non-overlapping windows of `window` ids that have a token to score."""
    chunks = [c for c in (ids[i: i + window] for i in range(0, len(ids), window)) if len(c) >= 2]
    if not chunks:
        raise LLMExportError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    return chunks


def perplexity(session, ids: list[int], window: int | None = None, batch: int | None = None,
               progress: Progress | None = None) -> Perplexity:
    """Perplexity of `session`'s bundle over `ids` (see the module docstring); `batch` caps the
    windows scored at once (default the bundle's max_batch). Each window is a scoring request of
    the session's engine, so scoring shares the engine with generation like any other request."""
    bundle, engine = session.bundle, session.engine
    window = min(window or bundle.max_seq_len, bundle.max_seq_len)
    if window < 2:
        raise LLMExportError(f"--window {window} must be at least 2 tokens")
    if any(not 0 <= t < bundle.vocab_size for t in ids):
        raise LLMExportError("the text has token ids outside the bundle's vocabulary; is it the bundle's tokenizer?")
    chunks = windows(ids, window)
    batch = max(1, min(batch or bundle.max_batch, bundle.max_batch))
    to_score = sum(len(c) - 1 for c in chunks)
    tick = progress or (lambda done, total: None)
    started, total, scored_before = time.perf_counter(), 0.0, 0
    tick(0, to_score)
    queue, running = list(reversed(chunks)), []
    params = SamplingParams(max_new_tokens=1)
    try:
        while queue or running:
            while queue and len(running) < batch:
                running.append(engine.submit(queue.pop(), params, score=True))
            seen = sum(len(r.prompt_logprobs) for r in running)
            engine.wait(lambda: any(r.done for r in running) or sum(len(r.prompt_logprobs) for r in running) != seen)
            for r in [r for r in running if r.done]:
                if r.finish_reason != "scored":
                    raise LLMExportError(r.error or f"scoring stopped: {r.finish_reason}")
                total -= sum(p.logprob for p in r.prompt_logprobs)
                scored_before += len(r.prompt_logprobs)
                running.remove(r)
            tick(scored_before + sum(len(r.prompt_logprobs) for r in running), to_score)
    finally:
        for r in running:
            r.cancel()
    mean = total / to_score
    return Perplexity(math.exp(mean), mean, to_score, len(chunks), window, time.perf_counter() - started)
