"""Hands out rows of the backend's preallocated KV buffers.

The engine takes single rows, lowest first, so the running requests stay packed at the bottom
of the buffers and each decode step runs over a short prefix of them (see runtime/engine.py);
scoring (runtime/evaluate.py) takes a contiguous range it drives itself.
"""

from __future__ import annotations

from llmexport import LLMExportError


class KVSlots:
    def __init__(self, rows: int):
        self.rows = rows
        self._free = set(range(rows))

    def take(self) -> int | None:
        """The lowest free row, or None when every row is in use."""
        if not self._free:
            return None
        row = min(self._free)
        self._free.remove(row)
        return row

    def take_range(self, n: int) -> range:
        """n contiguous free rows, lowest first."""
        if not 0 < n <= self.rows:
            raise LLMExportError(f"batch of {n} sequences exceeds the bundle's max_batch={self.rows}; "
                                 f"split the request or re-export with a larger --max-batch")
        for start in range(self.rows - n + 1):
            rows = range(start, start + n)
            if all(r in self._free for r in rows):
                self._free.difference_update(rows)
                return rows
        raise LLMExportError(f"no {n} free cache rows left (max_batch={self.rows}); wait for a request to finish")

    def free(self, rows: int | range) -> None:
        self._free.update([rows] if isinstance(rows, int) else rows)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.rows - len(self._free)
