"""`perplexity`: how well a bundle predicts a text, on any backend, dtype or quantization.

The text's token ids are cut into consecutive windows of `window` tokens (at most the bundle's
max_seq_len); within each window every token after the first is predicted from the ones before
it, and the windows do not overlap (what transformers' perplexity guide calls a stride equal
to the window). The graphs return the logits of each sequence's last token only, so a window
is fed one token per step: a one-token prefill, then decode steps, several windows side by side
as one batch. perplexity = exp(mean negative log-likelihood over every predicted token).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError

from .bundle import names as io


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


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logits[np.arange(len(targets)), targets] - log_norm


def perplexity(session, ids: list[int], window: int | None = None, batch: int | None = None) -> Perplexity:
    """Perplexity of `session`'s bundle over `ids` (see the module docstring)."""
    bundle = session.bundle
    window = min(window or bundle.max_seq_len, bundle.max_seq_len)
    if window < 2:
        raise LLMExportError(f"--window {window} must be at least 2 tokens")
    if any(not 0 <= t < bundle.vocab_size for t in ids):
        raise LLMExportError("the text has token ids outside the bundle's vocabulary; is it the bundle's tokenizer?")
    chunks = windows(ids, window)
    batch = max(1, min(batch or bundle.max_batch, bundle.max_batch, len(chunks)))
    started, total, scored = time.perf_counter(), 0.0, 0
    for start in range(0, len(chunks), batch):
        group = chunks[start: start + batch]
        rows = session.slots.take_range(len(group))
        try:
            nll, count = _score(session.backend, group, rows)
        finally:
            session.slots.free(rows)
        total, scored = total + nll, scored + count
    mean = total / scored
    return Perplexity(math.exp(mean), mean, scored, len(chunks), window, time.perf_counter() - started)


def _score(backend, group: list[list[int]], rows: range) -> tuple[float, int]:
    """Summed negative log-likelihood and count of every predicted token of `group`'s windows."""
    n, longest = len(group), max(len(c) for c in group)
    tokens = np.zeros((n, longest), dtype=np.int64)
    lengths = np.array([len(c) for c in group])
    for row, c in enumerate(group):
        tokens[row, : len(c)] = c
    logits = backend.step(io.PREFILL, tokens[:, :1], np.zeros((n, 1), np.int64), np.ones(n, np.int64), rows)
    total, count = 0.0, 0
    for t in range(1, longest):
        active = lengths > t
        total -= float(log_softmax_at(logits[active].astype(np.float64), tokens[active, t]).sum())
        count += int(active.sum())
        if t == longest - 1:
            break
        # Finished windows re-write their own last slot with a dummy token: harmless, never read.
        position = np.minimum(t, lengths - 1)
        step = np.where(active, tokens[:, t], 0)[:, None]
        logits = backend.step(io.DECODE, step, position[:, None], position + 1, rows)
    return total, count
