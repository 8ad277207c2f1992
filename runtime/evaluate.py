"""`perplexity`: how well a bundle predicts a text, on any backend, dtype or quantization.

The text's token ids are cut into consecutive windows of `window` tokens (at most the bundle's
max_seq_len); within each window every token after the first is predicted from the ones before
it, and the windows do not overlap (what transformers' perplexity guide calls a stride equal
to the window). perplexity = exp(mean negative log-likelihood over every predicted token).

Each window is scored in prefill calls that return the logits of every position
(`Backend.step(logits_at=...)`): a call reads the weights once for as many tokens as its logits
may take memory for (LOGITS_BYTES), where feeding a window one token per step read them once per
token. Windows short enough run side by side in one call; a longer window runs alone, in chunks
over its growing cache (ONNX Runtime's GroupQueryAttention takes S > 1 over a filled cache at
batch 1 only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError

from .bundle import names as io

LOGITS_BYTES = 256 << 20  # float32 logits one scoring call may return (441 positions of a 151,936 vocabulary)
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


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, block: int = 32) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] for (N, V) logits, in float64, `block` rows at a time
    (a float64 copy of every row at once would be 8 bytes x N x V)."""
    out = np.empty(len(targets))
    for i in range(0, len(targets), block):
        x = logits[i: i + block].astype(np.float64)
        top = x.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
        out[i: i + block] = x[np.arange(len(x)), targets[i: i + block]] - log_norm
    return out


def perplexity(session, ids: list[int], window: int | None = None, batch: int | None = None,
               progress: Progress | None = None) -> Perplexity:
    """Perplexity of `session`'s bundle over `ids` (see the module docstring); `batch` caps the
    windows scored side by side (default the bundle's max_batch)."""
    bundle = session.bundle
    window = min(window or bundle.max_seq_len, bundle.max_seq_len)
    if window < 2:
        raise LLMExportError(f"--window {window} must be at least 2 tokens")
    if any(not 0 <= t < bundle.vocab_size for t in ids):
        raise LLMExportError("the text has token ids outside the bundle's vocabulary; is it the bundle's tokenizer?")
    chunks = windows(ids, window)
    per_call = max(1, LOGITS_BYTES // (4 * bundle.vocab_size))  # positions whose logits one call returns
    side_by_side = per_call // (window - 1)  # whole windows per call (0: a window needs several calls)
    batch = max(1, min(batch or bundle.max_batch, bundle.max_batch, side_by_side, len(chunks)))
    to_score = sum(len(c) - 1 for c in chunks)
    tick = progress or (lambda done, total: None)
    started, total, scored = time.perf_counter(), 0.0, 0
    tick(0, to_score)
    for start in range(0, len(chunks), batch):
        group = chunks[start: start + batch]
        rows = session.slots.take_range(len(group))
        try:
            for nll, count in _score(session.backend, group, rows, per_call):
                total, scored = total + nll, scored + count
                tick(scored, to_score)
        finally:
            session.slots.free(rows)
    mean = total / scored
    return Perplexity(math.exp(mean), mean, scored, len(chunks), window, time.perf_counter() - started)


def _score(backend, group: list[list[int]], rows: range, per_call: int) -> Iterator[tuple[float, int]]:
    """(summed negative log-likelihood, count) of the tokens each call predicts: every window's
    tokens but its last are fed, right-padded side by side in one call, or, for one window, in
    chunks of `per_call` over its cache; the logits of every fed position score the next token."""
    fed = np.array([len(c) - 1 for c in group])
    tokens = np.zeros((len(group), int(fed.max()) + 1), dtype=np.int64)
    for row, c in enumerate(group):
        tokens[row, : len(c)] = c
    chunk = per_call if len(group) == 1 else int(fed.max())  # side by side: one call (fits per_call)
    for s in range(0, int(fed.max()), chunk):
        e = min(s + chunk, int(fed.max()))
        positions = np.tile(np.arange(s, e), (len(group), 1))
        every = np.tile(np.arange(e - s), (len(group), 1))
        # Shorter windows' padding takes the positions after their last token (slots never read).
        logits = backend.step(io.PREFILL, tokens[:, s:e], positions, np.minimum(fed, e), rows, logits_at=every)
        total, count = 0.0, 0
        for row in range(len(group)):
            n = min(e, fed[row]) - s  # fed positions of this row in this call
            if n > 0:
                total -= float(log_softmax_at(logits[row, :n], tokens[row, s + 1: s + 1 + n]).sum())
                count += n
        yield total, count
