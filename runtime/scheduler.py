"""Turns the engine's state into the plan of one iteration: which waiting requests take which
rows, which prompt chunks are prefilled in which calls, and the decode window.

- **Admission**: waiting requests take rows in arrival order (KVRows.take picks the row and the
  cached prefix). A request whose prompt shares most of itself with a prompt being prefilled
  right now waits until that prefix is in the cache, then copies it (n > 1, clients sharing a
  system prompt): the prefix is computed once.
- **Prefill**: with nothing decoding, every prompt is prefilled whole in this iteration; fresh
  prompts in adjacent rows go side by side in one right-padded call (a fresh prompt needs no
  cache, which every target batches). While others decode, at most `budget` tokens are
  prefilled, in one call (every call reads all the weights: a second call would stall the
  decoding requests twice). A chunk over a non-empty cache runs alone: ONNX Runtime's
  GroupQueryAttention takes S > 1 over a filled cache at batch 1 only. A request that needs the
  logits of every position it feeds gets at most `logit_positions` of them per call.
- **Decode**: one step over rows 0..W-1, W the smallest bucket (1, 2, 4, ..., the row count)
  above the highest decoding row, so a graph-capturing backend sees a few shapes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .kv_rows import KVRows, Lease, common_prefix
from .request import Request, State

LOGITS_BYTES = 256 << 20  # float32 logits one call may return (441 positions of a 151,936 vocabulary)
SHARED_MIN = 16  # a prompt waits for a prefix being prefilled only when it shares at least this many tokens


@dataclass(frozen=True)
class Chunk:
    request: Request
    start: int  # first prompt position fed
    length: int

    @property
    def whole(self) -> bool:
        """A fresh prompt fed at once: it needs no cache, so it goes side by side with others."""
        return self.start == 0 and self.length == self.request.feed


def buckets(rows: int) -> list[int]:
    """Decode batch shapes: powers of two below `rows`, then `rows`."""
    return sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows})


class Scheduler:
    def __init__(self, rows: KVRows, vocab_size: int):
        self.rows = rows
        self.buckets = buckets(rows.rows)
        self.logit_positions = max(1, LOGITS_BYTES // (4 * vocab_size))

    def admit(self, waiting: deque[Request], running: dict[int, Request]) -> list[Lease]:
        """Move waiting requests into rows (added to `running`, state PREFILLING or DECODING);
        the leases whose prefix the engine must copy before the iteration's steps."""
        copies = []
        for request in list(waiting):
            if self.rows.free_rows == 0:
                break
            if self._shares_prefix_being_computed(request, running.values()):
                continue
            lease = self.rows.take(request, request.ids, reuse=not request.wants_every_logit)
            waiting.remove(request)
            request.row, request.filled = lease.row, lease.cached
            request.reused = lease.cached
            running[lease.row] = request
            if lease.copy_from is not None:
                copies.append(lease)
            if request.feed - request.filled == 1 and request.filled and not request.wants_every_logit:
                # one token left over a cached prefix: a decode step feeds it (batched with the others)
                request.state, request.pending = State.DECODING, request.prompt[-1]
            else:
                request.state = State.PREFILLING
        return copies

    def _shares_prefix_being_computed(self, request: Request, running: Iterable[Request]) -> bool:
        if request.wants_every_logit:
            return False
        ids = request.ids[:-1]
        for other in running:
            if other.prefilling:
                shared = common_prefix(other.ids[: other.feed], ids)
                if shared >= max(SHARED_MIN, len(request.prompt) // 2) and self.rows.length(other.row) < shared:
                    return True
        return False

    def prefill(self, running: Iterable[Request], budget: int | None) -> list[list[Chunk]]:
        """The prefill calls of this iteration, in admission order (see the module docstring);
        budget None: nothing is decoding, prefill everything."""
        groups: list[list[Chunk]] = []
        for request in running:
            if not request.prefilling:
                continue
            if budget is not None and budget <= 0:
                break
            left = request.feed - request.filled
            length = left if budget is None else min(left, budget)
            if request.wants_every_logit:
                length = min(length, self.logit_positions)
            chunk = Chunk(request, request.filled, length)
            if self._joins(groups, chunk):
                groups[-1].append(chunk)
            elif budget is not None and groups:
                break
            else:
                groups.append([chunk])
            if budget is not None:
                budget -= length
        return groups

    def _joins(self, groups: list[list[Chunk]], chunk: Chunk) -> bool:
        if not groups or not chunk.whole:
            return False
        group, last = groups[-1], groups[-1][-1]
        if not last.whole or last.request.row + 1 != chunk.request.row:
            return False
        every = chunk.request.wants_every_logit
        if last.request.wants_every_logit != every:
            return False
        return not every or len(group) * max(chunk.length, max(c.length for c in group)) <= self.logit_positions

    def decode_window(self, decoding: list[Request]) -> int:
        """Rows 0..W-1 that one decode step runs over."""
        top = max(r.row for r in decoding)
        return next(b for b in self.buckets if b > top)
