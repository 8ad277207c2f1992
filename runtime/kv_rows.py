"""The one owner of the backend's KV rows: who holds each row, which tokens its cache holds, and
which row a new request gets.

A row's cache holds the keys and values of `tokens(row)`, slots 0..n-1; the engine reports every
write (`wrote`). When a request finishes, its row is freed but keeps its tokens (prompt reuse):
the next request whose prompt starts with them takes that row and prefills only the rest, as
llama.cpp's server does with a slot's cached prompt. A new request gets, in this order:

1. a free row whose kept tokens are all a prefix of its prompt (the longest such): a chat's next
   turn lands on its previous turn's row and nothing kept is lost;
2. an empty row (lowest first) or, when none is left, the least recently freed row; if any row,
   free or held, shares a prefix with the prompt, that prefix is copied into the new row
   (`Lease.copy_from`: the engine runs `backend.copy_row`) instead of being recomputed, so the
   row it came from keeps its own tokens.

Rows are taken lowest first among empty rows, so running requests stay packed at the bottom of
the buffers and the decode window (runtime/engine.py) stays short. Slots past a row's tokens
hold stale values that no step reads (attention reads slots below each row's length) and that
the row's next tokens overwrite.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lease:
    row: int
    cached: int  # the prompt's first tokens this row holds (after the copy, if any)
    copy_from: int | None = None  # copy slots 0..cached-1 of this row into `row` first


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int64 arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class KVRows:
    def __init__(self, rows: int, max_seq_len: int, reuse: bool = True):
        """reuse: keep finished rows' tokens and match new prompts against every row (False:
        every request prefills its whole prompt)."""
        self.rows, self.max_seq_len, self.reuse = rows, max_seq_len, reuse
        self._holder: dict[int, object] = {}  # held row -> its request
        self._tokens: list[list[int]] = [[] for _ in range(rows)]  # what each row's cache holds
        self._freed: dict[int, int] = {}  # free row with kept tokens -> when it was freed (least recent first)
        self._clock = itertools.count()

    # -- what the rows hold -----------------------------------------------------------------

    def tokens(self, row: int) -> list[int]:
        return self._tokens[row]

    def length(self, row: int) -> int:
        return len(self._tokens[row])

    def wrote(self, row: int, start: int, tokens: Sequence[int]) -> None:
        """The engine wrote `tokens` into `row`'s slots start.. (what was after them is stale)."""
        kept = self._tokens[row]
        del kept[start:]
        kept.extend(int(t) for t in tokens)

    def spare_slot(self, row: int) -> int:
        """A slot of `row` that a step may overwrite (a decode window's dummy token for a row
        that is not decoding): the one after its tokens, which holds nothing anyone reads."""
        return len(self._tokens[row])

    # -- taking and freeing -----------------------------------------------------------------

    def take(self, holder: object, prompt: Sequence[int] = (), reuse: bool = True) -> Lease | None:
        """A row for `holder`, and how much of `prompt` it holds already (at most all but its
        last token: the step that feeds the last token gives the logits to sample from). None
        when every row is held. reuse=False: the request needs every prompt position computed
        (prompt log-probabilities); it gets a row, never a cached prefix."""
        free = [r for r in range(self.rows) if r not in self._holder]
        if not free:
            return None
        usable = len(prompt) - 1
        matches: dict[int, int] = {}
        if self.reuse and reuse and usable > 0:
            ids = np.asarray(prompt[:usable], dtype=np.int64)
            for row in range(self.rows):
                if self._tokens[row]:
                    matches[row] = common_prefix(np.asarray(self._tokens[row], dtype=np.int64), ids)
        whole = [r for r in free if matches.get(r) and matches[r] == len(self._tokens[r])]
        if whole:
            row = max(whole, key=lambda r: (matches[r], -r))
            return self._lease(holder, row, matches[row])
        empty = [r for r in free if not self._tokens[r]]
        row = empty[0] if empty else min(free, key=lambda r: self._freed.get(r, -1))
        source = max(matches, key=lambda r: (matches[r], r == row), default=None)
        if source is None or matches[source] == 0:
            return self._lease(holder, row, 0)
        if source == row:  # the best prefix is in the row it takes anyway
            return self._lease(holder, row, matches[row])
        return self._lease(holder, row, matches[source], source)

    def _lease(self, holder: object, row: int, cached: int, copy_from: int | None = None) -> Lease:
        self._holder[row] = holder
        self._freed.pop(row, None)
        if copy_from is not None:
            self._tokens[row] = self._tokens[copy_from][:cached]
        else:
            del self._tokens[row][cached:]
        return Lease(row, cached, copy_from)

    def free(self, row: int, keep: bool = True) -> None:
        """`row`'s holder is done. keep: its tokens stay for the next prompt that starts with
        them (at most max_seq_len - 1, so a decode window has a spare slot to write)."""
        self._holder.pop(row, None)
        tokens = self._tokens[row]
        if not (keep and self.reuse):
            tokens.clear()
        del tokens[self.max_seq_len - 1:]
        if tokens:
            self._freed[row] = next(self._clock)

    def holder(self, row: int) -> object | None:
        return self._holder.get(row)

    @property
    def free_rows(self) -> int:
        return self.rows - len(self._holder)

    @property
    def in_use(self) -> int:
        """Rows held by requests (a free row that keeps tokens is not in use)."""
        return len(self._holder)

    def kept_tokens(self) -> int:
        """Tokens cached in free rows, ready for reuse."""
        return sum(len(self._tokens[r]) for r in range(self.rows) if r not in self._holder)
