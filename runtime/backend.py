"""The one interface every backend implements; the loop, sampling and stopping use only this.

A backend loads a bundle's prefill and decode graphs, allocates every KV buffer once for
`cache_rows (default max_batch) x max_seq_len` on its device, and runs one step on a contiguous range of cache rows
(runtime/engine.py decides which: a batch of fresh prompts, one prompt's chunk, or the decode window 0..W-1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from llmexport import LLMExportError

from .bundle import Bundle


class Backend(ABC):
    name: str = "backend"

    def __init__(self, bundle: Bundle, cache_rows: int | None = None, threads: int | None = None):
        """cache_rows: KV rows to allocate (default the bundle's max_batch); threads: CPU threads
        for the compute library (default: its own choice, usually every core)."""
        self.bundle = bundle
        self.cache_rows = bundle.max_batch if cache_rows is None else cache_rows
        if not 0 < self.cache_rows <= bundle.max_batch:
            raise LLMExportError(f"cache_rows={cache_rows} is outside 1..{bundle.max_batch} (the bundle's max_batch)")
        if threads is not None and threads < 1:
            raise LLMExportError(f"threads={threads} must be at least 1 (or unset for the library's default)")
        self.threads = threads
        self.graph_s = 0.0  # seconds spent inside the compute library's run calls (the engine's host-work figure)

    @abstractmethod
    def step(self, phase: str, input_ids: np.ndarray, position_ids: np.ndarray, seq_lens: np.ndarray,
             rows: range, copy: bool = True) -> np.ndarray:
        """Run `phase` ("prefill" or "decode") on cache rows `rows`.

        input_ids, position_ids: int64 (B, S); seq_lens: int64 (B,) valid tokens per sequence after
        this step; B == len(rows). Returns float32 logits (B, vocab) of each row's last real token.
        copy=False: the array may be a buffer the backend's next step overwrites (the engine
        samples before its next step, and saves a copy of B x vocab floats per step).
        """

    def check_step(self, seq_lens: np.ndarray, rows: range) -> None:
        """The request must fit the caches: a clear error instead of a kernel's."""
        if rows.stop > self.cache_rows or rows.start < 0:
            raise LLMExportError(f"cache rows {rows.start}..{rows.stop - 1} are outside the {self.cache_rows} "
                                 f"allocated rows (the bundle's max_batch is {self.bundle.max_batch})")
        if len(seq_lens) and int(np.max(seq_lens)) > self.bundle.max_seq_len:
            raise LLMExportError(f"sequence length {int(np.max(seq_lens))} exceeds the bundle's max_seq_len="
                                 f"{self.bundle.max_seq_len}")

    @abstractmethod
    def cache_addresses(self) -> list[int]:
        """Device address of every KV buffer (tests check decode never reallocates or copies them)."""

    @abstractmethod
    def cache_arrays(self, rows: range, length: int | None = None) -> list[np.ndarray]:
        """Host copies of every layer's key and value buffer (in that order) for `rows`, of the
        first `length` slots (default all)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
