"""Log-probabilities from raw logits, in float64: of chosen tokens (scoring, OpenAI's `logprobs`)
and of the most likely tokens (`top_logprobs`). They describe the model's distribution, before
temperature, penalties or masks (what vLLM returns by default)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: nothing predicts it (a prompt's first token)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at that position, most likely first


def log_normalisers(logits: np.ndarray, block: int = 32) -> np.ndarray:
    """log sum exp of each row of (N, V) logits, `block` rows at a time in float64 (a float64 copy
    of every row at once would be 8 bytes x N x V)."""
    out = np.empty(len(logits))
    for i in range(0, len(logits), block):
        x = logits[i: i + block].astype(np.float64)
        top = x.max(axis=-1, keepdims=True)
        out[i: i + block] = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return out


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, block: int = 32) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] for (N, V) logits."""
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_normalisers(logits, block)


def token_logprobs(logits: np.ndarray, targets, top: int = 0) -> list[TokenLogprob]:
    """For (N, V) logits and N target ids: each target's log-probability and the `top` most
    likely tokens with theirs (ties: lower id first)."""
    targets = np.asarray(targets, dtype=np.int64)
    norms = log_normalisers(logits)
    chosen = logits[np.arange(len(targets)), targets].astype(np.float64) - norms
    out = []
    for i, target in enumerate(targets):
        best: tuple[tuple[int, float], ...] = ()
        if top:
            row = logits[i]
            if top < len(row):  # every id at least as likely as the top-th, so ties keep the lower ids
                ids = np.flatnonzero(row >= row[np.argpartition(-row, top - 1)[top - 1]])
            else:
                ids = np.arange(len(row))
            ids = ids[np.lexsort((ids, -row[ids]))][:top]
            best = tuple((int(t), float(row[t]) - float(norms[i])) for t in ids)
        out.append(TokenLogprob(int(target), float(chosen[i]), best))
    return out
