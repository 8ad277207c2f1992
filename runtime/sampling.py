"""Sampling in numpy: greedy, temperature, top-k, top-p, repetition, presence and frequency
penalties, logit bias, a token mask (structured output), seeded.

Order, as vLLM's: the logits are adjusted (repetition penalty on every token seen, prompt
included; presence and frequency penalties on generated tokens, OpenAI's definition; logit
bias; the mask), then scaled by the temperature, then cut by top-k and top-p."""

from __future__ import annotations

import threading
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
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # ... and this, times the number of times it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)
    logprobs: int | None = None  # None: off; k: each sampled token's log-probability and the k most likely

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**63, f"seed={self.seed} must be an integer in 0..2**63-1"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs={self.logprobs} must be in 0..20"),
        ]
        for ok, message in checks:
            if not ok:
                raise LLMExportError(message)


class Sampler:
    """One sequence's sampler: its own seeded generator, and the tokens it has seen (prompt and
    output, for the repetition penalty; output counts, for presence and frequency) kept as they
    come, so a step never re-scans the history. `mask`, when set, is called on each step's
    adjusted logits and sets the tokens it forbids to -inf (runtime/grammar.py)."""

    def __init__(self, params: SamplingParams, seen: Sequence[int] = (), mask=None):
        self.params = params
        self.mask = mask
        self.rng = np.random.default_rng(params.seed)
        self._penalised = params.repetition_penalty != 1.0
        self._counted = bool(params.presence_penalty or params.frequency_penalty)
        self._bias = (np.array([t for t, _ in params.logit_bias], dtype=np.int64),
                      np.array([b for _, b in params.logit_bias], dtype=np.float32)) if params.logit_bias else None
        self._seen: set[int] = set()
        self._ids = np.empty(64, dtype=np.int64)  # the distinct seen ids, first len(_seen) entries
        self._counts: dict[int, int] = {}  # generated id -> times
        self.observe(seen)

    def observe(self, tokens: Sequence[int]) -> None:
        """Record tokens of the sequence's prompt (or, for tests, output) for the repetition penalty."""
        if not self._penalised:
            return
        for t in tokens:
            t = int(t)
            if t not in self._seen:
                if len(self._seen) == len(self._ids):
                    self._ids = np.resize(self._ids, 2 * len(self._ids))
                self._ids[len(self._seen)] = t
                self._seen.add(t)

    def generated(self, token: int) -> None:
        """Record a token the sequence generated (every penalty counts it)."""
        self.observe((token,))
        if self._counted:
            self._counts[int(token)] = self._counts.get(int(token), 0) + 1

    @property
    def adjusts(self) -> bool:
        """Whether logits are changed before the temperature (else greedy is a plain argmax)."""
        return self._penalised or self._counted or self._bias is not None or self.mask is not None

    def __call__(self, logits: np.ndarray) -> int:
        """The next token from one row of float logits (V,), which is left as it is; the caller
        records the tokens it keeps (generated). A few passes over the row and no sort of it
        (runtime/README: host work per step)."""
        p = self.params
        if p.temperature == 0 and not self.adjusts:
            return int(np.argmax(logits))
        work = _workspace(len(logits))
        if self._counted or self._bias is not None or self.mask is not None:  # additive: before the temperature
            x = self._adjusted(logits, work.x)
            if p.temperature:
                np.multiply(x, 1.0 / p.temperature, out=x)
        else:
            # temperature first is the same as after the repetition penalty: both keep the sign and
            # scale (a product by the reciprocal: a division is 2-3x slower per element)
            x = np.multiply(logits, 1.0 / (p.temperature or 1.0), out=work.x)
            self._repetition(x)
        if p.temperature == 0:
            return int(np.argmax(x))
        x -= x.max()  # log-probabilities up to the normaliser
        # e^-80 is a normal float32; e^-88 and below are denormals, 10-100x slower in every later
        # pass. A token 80 nats or more below the most likely one keeps weight e^-80 (< 2e-35).
        if x.min() < -FLOOR:  # a mask's -inf stays: those tokens are forbidden, not unlikely
            np.maximum(x, -FLOOR, out=x, where=True if self.mask is None else np.isfinite(x, out=work.mask))
        if p.top_k and p.top_k < len(x):
            np.copyto(x, -np.inf, where=np.less(x, _kth_largest(x, p.top_k, work.mask), out=work.mask))
        if p.top_p < 1.0:
            return self._top_p(x, p.top_p, work)
        return _Chunks(np.exp(x, out=x), work.padded_x).draw(self.rng.random())

    def _repetition(self, x: np.ndarray) -> None:
        if self._penalised and self._seen:
            ids = self._ids[: len(self._seen)]
            values = x[ids]
            x[ids] = np.where(values > 0, values / self.params.repetition_penalty,
                              values * self.params.repetition_penalty)

    def _adjusted(self, logits: np.ndarray, x: np.ndarray) -> np.ndarray:
        """logits with every penalty, the bias and the mask applied, in `x`."""
        np.copyto(x, logits)
        self._repetition(x)
        if self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            x[ids] -= counts * self.params.frequency_penalty + self.params.presence_penalty
        if self._bias is not None:
            x[self._bias[0]] += self._bias[1]
        if self.mask is not None:
            self.mask(x)
            if not np.isfinite(x.max()):
                raise LLMExportError("the output constraint allows no token here")
        return x

    def _top_p(self, x: np.ndarray, top_p: float, work: _Workspace) -> int:
        """A draw from the nucleus by rejection: draw from the whole row, keep the token if it lies
        in the nucleus (the mass before it in a stable sort is under top_p of the total), else draw
        again. The kept mass is at least top_p, so this takes 1/top_p draws on average, each a few
        passes over the row; after TRIES rejections the nucleus is built (Nucleus) and drawn from.
        Either way the token follows the nucleus' renormalised weights exactly: the tries give token
        i with probability p_i (1 + (1-P) + ... + (1-P)^(TRIES-1)) and the nucleus draw
        (1-P)^TRIES p_i / P, summing to p_i / P (P: the kept mass). The weights replace x in place
        (two live row buffers instead of three: each pass stays in a core's cache)."""
        probs = np.exp(x, out=x)
        chunks = _Chunks(probs, work.padded_x)
        for _ in range(TRIES):
            token = chunks.draw(self.rng.random())
            if _in_nucleus(probs, token, top_p, chunks.total, work.flags):
                return token
        with np.errstate(divide="ignore"):  # log(0) = -inf: top-k's excluded tokens
            logs = np.log(probs, out=work.probs)  # monotone in probs: the same nucleus
        return Nucleus(logs, top_p, work, probs=probs).draw(self.rng.random())


class _Workspace:
    """Row-sized scratch arrays, reused from step to step: a fresh 0.6-1.2 MB array each step
    costs more in page faults than the arithmetic on it (glibc maps blocks this large afresh).
    x is the head of a zero-padded buffer a whole number of chunks long, so _Chunks sums the
    weights exp'd into it as rows of a matrix (3x faster than numpy's reduceat over the same
    chunks)."""

    def __init__(self, size: int):
        padded = -(-size // _Chunks.WIDTH) * _Chunks.WIDTH
        self.padded_x = np.zeros(padded, np.float32)
        self.x, self.probs = self.padded_x[:size], np.empty(size, np.float32)
        self.bins, self.mask = np.empty(size, np.intp), np.empty(size, bool)
        self.flags = np.empty(size, np.float32)


_local = threading.local()


def _workspace(size: int) -> _Workspace:
    work = getattr(_local, "work", None)
    if work is None or len(work.x) != size:
        work = _local.work = _Workspace(size)
    return work


class _Chunks:
    """A row of weights with one sum per 1,024-wide chunk, for draws: a cumulative sum of a
    151,936-wide row is ~1.5 ms, the chunk sums ~0.01 and a draw's cumulative sum inside one
    chunk ~0.01. Zero weights are never drawn. `padded`, when given, is the buffer `weights`
    heads, zero past it to a whole number of chunks: its chunk sums are row sums."""

    WIDTH = 1024

    def __init__(self, weights: np.ndarray, padded: np.ndarray | None = None):
        self.weights = weights
        if padded is not None and len(padded) % self.WIDTH == 0 and (
                padded.__array_interface__["data"][0] == weights.__array_interface__["data"][0]):
            sums = np.einsum("ij->i", padded.reshape(-1, self.WIDTH))  # the padding adds zeros
        else:
            sums = np.add.reduceat(weights, np.arange(0, len(weights), self.WIDTH))
        self.cumulative = np.cumsum(sums, dtype=np.float64)
        self.total = float(self.cumulative[-1])  # float32 chunk sums: within 2^-14 of the exact sum

    def draw(self, u: float) -> int:
        """The index where u (in [0, 1)) falls in the cumulative weights."""
        target = u * self.total
        c = min(int(np.searchsorted(self.cumulative, target, side="right")), len(self.cumulative) - 1)
        start = c * self.WIDTH
        inside = np.cumsum(self.weights[start: start + self.WIDTH], dtype=np.float64)
        target -= self.cumulative[c - 1] if c else 0.0
        return start + min(int(np.searchsorted(inside, target, side="right")), len(inside) - 1)


def _draw(weights: np.ndarray, u: float) -> int:
    return _Chunks(weights).draw(u)


def _in_nucleus(probs: np.ndarray, token: int, top_p: float, total: float, larger: np.ndarray) -> bool:
    """Whether `token` is in the top-p nucleus of `probs` as Nucleus and a stable sort define it:
    the mass of the tokens before it (more likely, or as likely with a smaller id) is under
    top_p of the float64 total. `larger` (float32 scratch) flags the more likely tokens and a
    product sums them (einsum: numpy's own loop; a masked sum, `where=`, branches per element
    and is 20x slower on a flat row, and BLAS's dot starts threads that keep spinning into the
    next graph run). Float32 sums first: the bound on their error, n * 2^-24 of the total for n
    nonnegative terms in any order (for this sum, and for `total`, a sum of float32 chunk sums),
    decides all but the tokens that close to the boundary, which are summed again in float64.
    The tokens as likely as this one and before it (ties) are counted only when they could
    change the answer."""
    p = probs[token]
    np.greater(probs, p, out=larger, casting="unsafe")
    above, target = float(np.einsum("i,i->", probs, larger)), top_p * total
    slack = 2 * len(probs) * 2.0**-24 * total
    if above - slack >= target:  # out whatever ties precede it
        return False
    if above + slack + float(p) * token < target:  # in even if every token before it ties with it
        return True
    ties = float(p) * np.count_nonzero(probs[:token] == p)  # as likely and before it in a stable sort
    if abs(above + ties - target) > slack:
        return above + ties < target
    before = float(np.add.reduce(np.multiply(probs, larger, out=larger), dtype=np.float64)) + ties  # exact products
    return before < top_p * float(np.add.reduce(probs, dtype=np.float64))


def _kth_largest(x: np.ndarray, k: int, mask: np.ndarray) -> float:
    """The k-th largest value (x: max 0), partitioning only the values within a gap of the
    maximum, the gap doubled from 1/4 nat until at least k values are inside: a few comparisons
    and counts over the row instead of a partition of it."""
    gap = 0.25
    while gap < 2 * FLOOR and np.count_nonzero(np.greater_equal(x, -gap, out=mask)) < k:
        gap *= 2
    ids = np.flatnonzero(mask) if gap < 2 * FLOOR else np.arange(len(x))
    return float(np.partition(x[ids], len(ids) - k)[len(ids) - k])


FLOOR = 80.0
TRIES = 3  # rejected nucleus draws before the nucleus is built
BINS_PER_NAT, NATS = 64, 64
BINS = BINS_PER_NAT * NATS
NEAR = 16.0


class Nucleus:
    """Top-p over log-probabilities `x` (max 0, unnormalised; -inf for excluded tokens): the
    smallest most-likely prefix whose mass reaches top_p, the prefix ordered as a stable sort of
    the whole row orders it (ties by token id).

    No sort of the row: the mass is binned by log-probability (1/64 nat per bin, one bincount,
    the last bin holding everything 64 nats or more below the top); every token of a bin before
    the one where the cumulative mass crosses top_p is kept, and only that edge bin's tokens are
    sorted to place the boundary exactly. When the tokens within 16 nats of the top already hold
    top_p of the mass (a peaked row), only they are binned. `x` is overwritten; `work` is scratch."""

    def __init__(self, x: np.ndarray, top_p: float, work: _Workspace | None = None,
                 probs: np.ndarray | None = None):
        """probs: e^x when the caller has it (then x may be any monotone image of it, such as its
        log: the bins only need the order, the kept mass and draws use probs)."""
        work = work or _Workspace(len(x))
        probs = np.exp(x, out=work.probs) if probs is None else probs
        self.mask = work.mask
        target = top_p * float(np.add.reduce(probs, dtype=np.float64))
        self.ids = None
        if np.count_nonzero(np.greater_equal(x, -NEAR, out=work.mask)) < len(x) // 4:
            near = np.flatnonzero(work.mask)
            self.ids = near if probs[near].sum(dtype=np.float64) >= target else None
        if self.ids is not None:  # the kept prefix lies among these: bin only them
            x, probs = x[self.ids], probs[self.ids]
            self.mask = np.empty(len(x), bool)
        self.probs, self.bins = probs, work.bins[: len(x)]
        np.maximum(x, -NATS, out=x)  # the last bin: everything NATS or more below the top
        np.copyto(self.bins, np.multiply(x, -(BINS_PER_NAT - 1e-3), out=x), casting="unsafe")  # 0 .. BINS - 1
        self.cumulative = np.cumsum(np.bincount(self.bins, weights=probs, minlength=BINS))
        self.edge = min(int(np.searchsorted(self.cumulative, target)), BINS - 1)  # first bin reaching top_p
        self.above = float(self.cumulative[self.edge - 1]) if self.edge else 0.0  # mass of the bins before it
        ties = self._members(self.edge)
        ties = ties[np.argsort(-probs[ties], kind="stable")]
        before = self.above + np.cumsum(probs[ties], dtype=np.float64) - probs[ties]
        self.ties = ties[before < target]  # the edge bin's kept tokens, most likely first

    def _members(self, b: int) -> np.ndarray:
        return np.flatnonzero(np.equal(self.bins, b, out=self.mask[: len(self.bins)]))

    def _token(self, i) -> int:
        return int(i if self.ids is None else self.ids[i])

    def kept(self) -> np.ndarray:
        """Every kept id, ascending (tests; draw does not build it)."""
        kept = np.concatenate([np.flatnonzero(self.bins < self.edge), self.ties])
        return np.sort(kept if self.ids is None else self.ids[kept])

    def draw(self, u: float) -> int:
        """The token at u (in [0, 1)) of the kept mass: a bin by the binned cumulative mass, then a
        token inside it."""
        ties = self.probs[self.ties].astype(np.float64)
        target = u * (self.above + ties.sum())
        if target >= self.above:
            inside = np.cumsum(ties)
            return self._token(self.ties[min(int(np.searchsorted(inside, target - self.above, side="right")),
                                             len(ties) - 1)])
        b = int(np.searchsorted(self.cumulative, target, side="right"))
        members = self._members(b)
        inside = np.cumsum(self.probs[members], dtype=np.float64)
        target -= self.cumulative[b - 1] if b else 0.0
        return self._token(members[min(int(np.searchsorted(inside, target, side="right")), len(members) - 1)])
