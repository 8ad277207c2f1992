"""Speculative decoding: propose a row's next tokens cheaply, check them all in one call.

A decode step reads every weight for one token per row; a verification step feeds a row's
pending token and k proposed tokens in one prefill call over its cache and returns the logits of
all k + 1 positions. The engine then samples position by position with the request's own sampler
and keeps going while the sampled token equals the proposal: every emitted token is a draw from
the model's distribution given the tokens before it, exactly what plain decoding draws (for a
proposer that proposes one token with certainty, speculative sampling's acceptance test,
accept x with probability min(1, p(x) / q(x)) = p(x) and on rejection draw from p without x, is
the same as drawing from p and comparing). Greedy output is identical to plain decoding, and a
seeded sampled output uses the same draws in the same order. Rejected proposals' keys and values
sit past the row's tokens, where nothing reads them before they are overwritten.

Proposers:
- `PromptLookup` (n-gram): the last n tokens of the sequence (n from `max_ngram` down to
  `min_ngram`) found earlier in the prompt or output; the tokens that followed are proposed.
  No second model; pays where output copies input (code edits, retrieval answers, reformatting).
- `DraftModel`: a smaller bundle with the same tokenizer (`--draft DIR`) decodes k tokens
  greedily; its row r mirrors the target's row r and keeps what it has computed, so each round
  feeds it only the tokens it has not seen (a rejected proposal is dropped by comparing what it
  holds with the target's sequence).

Whether to verify or decode is decided per iteration by measured cost (`SpeculationCost`):
ONNX Runtime's CPU GroupQueryAttention takes S > 1 over a filled cache at batch 1 only, so
verification is one call per row while a decode step serves every row at once. The engine
compares expected tokens per second: a batched decode gives one token per row in the time of a
decode step; verifying row r gives 1 + sum_{i=1..k} a_r^i tokens (a_r: the row's measured
per-token acceptance) in the time of a verification of k + 1 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError

from .bundle import names as io
from .kv_rows import common_prefix

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculationConfig:
    method: str = "ngram"
    tokens: int = 5  # proposals per verification (k)
    max_ngram: int = 4  # longest suffix looked up
    min_ngram: int = 1
    draft: str | None = None  # the draft bundle's directory (method "draft")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LLMExportError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}")
        if (self.method == "draft") != (self.draft is not None):
            raise LLMExportError("speculative 'draft' needs a draft bundle (--draft DIR), and a draft bundle needs "
                                 "speculative 'draft'")
        if not 1 <= self.tokens <= 32:
            raise LLMExportError(f"speculative tokens={self.tokens} must be in 1..32")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise LLMExportError(f"n-gram lengths {self.min_ngram}..{self.max_ngram} must satisfy 1 <= min <= max")


class PromptLookup:
    """One sequence's n-gram proposer. The sequence (prompt, then every kept token) is kept in a
    growing int64 array, so a lookup is a few vectorised comparisons over it."""

    def __init__(self, config: SpeculationConfig, prompt: Sequence[int]):
        self.config = config
        self._ids = np.empty(max(64, 2 * len(prompt)), dtype=np.int64)
        self._n = 0
        self.extend(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        if self._n + len(tokens) > len(self._ids):
            self._ids = np.resize(self._ids, 2 * (self._n + len(tokens)))
        self._ids[self._n: self._n + len(tokens)] = tokens
        self._n += len(tokens)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
        tokens (the longest n that occurs)."""
        ids, n_all = self._ids, self._n
        for n in range(min(self.config.max_ngram, n_all - 1), self.config.min_ngram - 1, -1):
            suffix = ids[n_all - n: n_all]
            # starts i < n_all - n whose n tokens equal the suffix (the suffix itself excluded)
            hits = np.ones(n_all - n, dtype=bool)
            for j in range(n):
                hits &= ids[j: n_all - n + j] == suffix[j]
            found = np.flatnonzero(hits)
            if len(found):
                start = int(found[-1]) + n
                return ids[start: min(start + k, n_all)].tolist()
        return []


class DraftModel:
    """Greedy proposals from a draft bundle's backend, one draft row per target row."""

    def __init__(self, backend, target_bundle):
        draft = backend.bundle
        if draft.vocab_size > target_bundle.vocab_size:
            raise LLMExportError(f"the draft model's vocabulary ({draft.vocab_size}) is larger than the target's "
                                 f"({target_bundle.vocab_size}); a draft must share the target's tokenizer")
        mine, theirs = draft.tokenizer_path, target_bundle.tokenizer_path
        if mine and theirs and mine.read_bytes() != theirs.read_bytes():
            raise LLMExportError(f"the draft bundle {draft.path} has another tokenizer than the target; a draft "
                                 f"must share the target's tokenizer")
        self.backend = backend
        self.held: list[list[int]] = [[] for _ in range(backend.cache_rows)]  # what each draft row's cache holds

    def propose(self, row: int, sequence: list[int], k: int) -> list[int]:
        """k greedy tokens after `sequence` (which ends with the target's pending token)."""
        if len(sequence) + k - 1 > self.backend.bundle.max_seq_len:
            return []
        held = self.held[row]
        start = common_prefix(np.asarray(held, dtype=np.int64), np.asarray(sequence[:-1], dtype=np.int64))
        fed = sequence[start:]
        logits = self.backend.step(io.PREFILL, np.array([fed], dtype=np.int64),
                                   np.arange(start, len(sequence), dtype=np.int64)[None], np.array([len(sequence)]),
                                   range(row, row + 1), copy=False)
        held = self.held[row] = list(sequence)
        out = [int(np.argmax(logits[0]))]
        while len(out) < k:
            n = len(held)
            logits = self.backend.step(io.DECODE, np.array([[out[-1]]]), np.array([[n]]), np.array([n + 1]),
                                       range(row, row + 1), copy=False)
            held.append(out[-1])
            out.append(int(np.argmax(logits[0])))
        return out

    def close(self) -> None:
        self.backend.close()


class SpeculationCost:
    """Measured costs: seconds of a decode step per window width and of a verification per
    number of fed tokens (moving averages), and each request's per-token acceptance."""

    SMOOTHING = 0.3
    PRIOR = 0.5  # acceptance assumed before a request's first verification

    def __init__(self):
        self.decode_s: dict[int, float] = {}
        self.verify_s: dict[int, float] = {}

    def _update(self, table: dict[int, float], key: int, seconds: float) -> None:
        old = table.get(key)
        table[key] = seconds if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * seconds

    def decoded(self, window: int, seconds: float) -> None:
        self._update(self.decode_s, window, seconds)

    def verified(self, fed: int, seconds: float) -> None:
        self._update(self.verify_s, fed, seconds)

    def _verify_estimate(self, fed: int) -> float | None:
        if fed in self.verify_s:
            return self.verify_s[fed]
        if not self.verify_s:
            return None
        nearest = min(self.verify_s, key=lambda f: abs(f - fed))  # the cost grows slowly with fed tokens
        return self.verify_s[nearest]

    @staticmethod
    def expected_tokens(acceptance: float, k: int) -> float:
        """Tokens a verification of k proposals emits on average: 1 + a + a^2 + ... + a^k."""
        return 1 + sum(acceptance ** i for i in range(1, k + 1))

    def worth_it(self, window: int, proposals: list[tuple[float, int]], idle: int, idle_window: int) -> bool:
        """Whether verifying each proposing row alone (acceptance, k per row), plus one decode
        step of width `idle_window` for the `idle` rows without proposals, gives more tokens per
        second than one decode step of width `window` for every row. Unmeasured costs say yes:
        the first verification measures them."""
        decode = self.decode_s.get(window)
        verify = [self._verify_estimate(k + 1) for _, k in proposals]
        if decode is None or any(v is None for v in verify):
            return True
        rest = self.decode_s.get(idle_window, decode) if idle else 0.0
        tokens = sum(self.expected_tokens(a, k) for a, k in proposals) + idle
        return tokens / (sum(verify) + rest) > (len(proposals) + idle) / decode


class Acceptance:
    """One request's per-token acceptance, a moving average over its verifications."""

    def __init__(self, prior: float = SpeculationCost.PRIOR):
        self.rate = prior
        self.proposed = self.accepted = 0

    def update(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        trials = accepted + (1 if accepted < proposed else 0)  # tokens compared until the first miss
        if trials:
            self.rate = (1 - SpeculationCost.SMOOTHING) * self.rate + SpeculationCost.SMOOTHING * accepted / trials
