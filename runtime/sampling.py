"""Sampling in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (transformers' definition)
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    eos_token_ids: tuple[int, ...] | None = None  # None: the bundle's
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**63, f"seed={self.seed} must be an integer in 0..2**63-1"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise LLMExportError(message)


class Sampler:
    """One sequence's sampler: its own seeded generator, and the tokens it has seen (prompt and
    output, for the repetition penalty) kept as they come, so a step never re-scans the history."""

    def __init__(self, params: SamplingParams, seen: Sequence[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._penalised = params.repetition_penalty != 1.0
        self._seen: set[int] = set()
        self._ids = np.empty(64, dtype=np.int64)  # the distinct seen ids, first len(_seen) entries
        self.observe(seen)

    def observe(self, tokens: Sequence[int]) -> None:
        """Record tokens of the sequence (the prompt at the start, then each sampled token)."""
        if not self._penalised:
            return
        for t in tokens:
            t = int(t)
            if t not in self._seen:
                if len(self._seen) == len(self._ids):
                    self._ids = np.resize(self._ids, 2 * len(self._ids))
                self._ids[len(self._seen)] = t
                self._seen.add(t)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token from one row of float logits (V,); the caller observes what it keeps."""
        p = self.params
        if p.temperature == 0 and not self._penalised:
            return int(np.argmax(logits))
        logits = logits.astype(np.float32, copy=True)
        if self._penalised and self._seen:
            ids = self._ids[: len(self._seen)]
            values = logits[ids]
            logits[ids] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits /= p.temperature
        if p.top_k and p.top_k < len(logits):  # the k-th largest by partition, O(V), not a sort of the vocabulary
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        kept = np.flatnonzero(probs)  # after top-k/top-p a few hundred tokens: draw among those only
        weights = probs[kept]
        return int(kept[self.rng.choice(len(kept), p=weights / weights.sum())])


def _top_p(probs: np.ndarray, top_p: float, first: int = 64) -> np.ndarray:
    """`probs` with only the smallest most-likely prefix reaching `top_p` kept, renormalised;
    the prefix is ordered as a stable sort of the whole row would order it (ties by token id).
    Only the most likely candidates are sorted: the `n` largest (and every token tied with the
    n-th), n doubling from `first` until their mass reaches top_p, so a 151,936-token row costs
    a partition and a sort of a few hundred values, not a sort of the vocabulary."""
    size, n = probs.shape[-1], min(first, probs.shape[-1])
    while True:
        cut = np.partition(probs, size - n)[size - n]  # the n-th largest value
        candidates = np.flatnonzero(probs >= cut)  # ascending ids: ties stay in id order below
        ordered = candidates[np.argsort(-probs[candidates], kind="stable")]
        mass = np.cumsum(probs[ordered])
        if mass[-1] >= top_p or len(candidates) == size or n == size:
            before = mass - probs[ordered]  # mass of the more likely tokens
            kept = ordered[before < top_p]
            out = np.zeros_like(probs)
            out[kept] = probs[kept]
            return out / out.sum()
        n = min(2 * n, size)
