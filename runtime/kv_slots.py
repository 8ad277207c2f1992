"""Hands out rows of the backend's preallocated KV buffers to the sequences of a request.

Rows are given as one contiguous range so a request's caches are a single view of each buffer
(bindable by pointer, capturable in a CUDA graph).
"""

from __future__ import annotations

from llmexport import LLMExportError


class KVSlots:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self._used: list[range] = []

    def allocate(self, n: int) -> range:
        if not 0 < n <= self.max_batch:
            raise LLMExportError(f"batch of {n} sequences exceeds the bundle's max_batch={self.max_batch}; "
                                 f"split the request or re-export with a larger --max-batch")
        start = 0
        for used in sorted(self._used, key=lambda r: r.start):
            if used.start - start >= n:
                break
            start = used.stop
        if start + n > self.max_batch:
            raise LLMExportError(f"no {n} free cache rows left (max_batch={self.max_batch}); wait for a request to finish")
        rows = range(start, start + n)
        self._used.append(rows)
        return rows

    def free(self, rows: range) -> None:
        self._used.remove(rows)

    @property
    def in_use(self) -> int:
        return sum(len(r) for r in self._used)
