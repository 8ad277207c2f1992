"""The one interface every backend implements; the loop, sampling and stopping use only this.

A backend loads a bundle's prefill and decode graphs, allocates every KV buffer once for
`cache_rows (default max_batch) x max_seq_len` on its device, and runs one step on a contiguous range of cache rows
(runtime/engine.py decides which: a batch of fresh prompts, one prompt's chunk, or the decode window 0..W-1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from llmexport import LLMExportError

from ..bundle import Bundle
from ..bundle import names as io


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
        self.run_s = 0.0  # seconds spent inside the compute library's run calls (the engine's host-work figure)

    @abstractmethod
    def step(self, phase: str, input_ids: np.ndarray, position_ids: np.ndarray, seq_lens: np.ndarray,
             rows: range, copy: bool = True, logits_at: np.ndarray | None = None) -> np.ndarray:
        """Run `phase` ("prefill" or "decode") on cache rows `rows`.

        input_ids, position_ids: int64 (B, S); seq_lens: int64 (B,) valid tokens per sequence after
        this step; B == len(rows). Returns float32 logits (B, vocab) of each row's last real token;
        with `logits_at` (prefill only), int64 (B, K) positions of this step (0..S-1), the logits
        at those positions, (B, K, vocab), in a fresh array (scoring, checking proposed tokens).
        copy=False: the (B, vocab) array may be a buffer the backend's next step overwrites (the
        engine samples before its next step, and saves a copy of B x vocab floats per step).
        """

    def check_logits_at(self, phase: str, input_ids: np.ndarray, logits_at: np.ndarray | None) -> None:
        if logits_at is None:
            return
        if phase != io.PREFILL:
            raise LLMExportError("logits at chosen positions come from the prefill graph; run the step as prefill")
        s = input_ids.shape[1]
        if logits_at.ndim != 2 or logits_at.shape[0] != input_ids.shape[0] or not logits_at.size:
            raise LLMExportError(f"logits_at has shape {logits_at.shape}; expected (batch, K) with batch "
                                 f"{input_ids.shape[0]} and K >= 1")
        if int(logits_at.min()) < 0 or int(logits_at.max()) >= s:
            raise LLMExportError(f"logits_at holds positions outside this step's 0..{s - 1}")

    def check_step(self, seq_lens: np.ndarray, rows: range) -> None:
        """The request must fit the caches: a clear error instead of a kernel's."""
        if rows.stop > self.cache_rows or rows.start < 0:
            raise LLMExportError(f"cache rows {rows.start}..{rows.stop - 1} are outside the {self.cache_rows} "
                                 f"allocated rows (the bundle's max_batch is {self.bundle.max_batch})")
        if len(seq_lens) and int(np.max(seq_lens)) > self.bundle.max_seq_len:
            raise LLMExportError(f"sequence length {int(np.max(seq_lens))} exceeds the bundle's max_seq_len="
                                 f"{self.bundle.max_seq_len}")

    @abstractmethod
    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cache slots of row `src` into row `dst`, every layer's key and
        value: a prompt prefix prefilled once, shared by other rows (n > 1, a common system
        prompt). Row `dst`'s later slots are left as they are."""

    def check_copy_row(self, src: int, dst: int, length: int, slots: int | None = None) -> None:
        """`slots`: the cache slots per row this backend allocated (default the bundle's max_seq_len)."""
        for row in (src, dst):
            if not 0 <= row < self.cache_rows:
                raise LLMExportError(f"cache row {row} is outside the {self.cache_rows} allocated rows "
                                     f"0..{self.cache_rows - 1} (the bundle's max_batch is {self.bundle.max_batch})")
        slots = self.bundle.max_seq_len if slots is None else slots
        if not 0 <= length <= slots:
            raise LLMExportError(f"cannot copy {length} cache slots: a row holds 0..{slots} (the bundle's "
                                 f"max_seq_len is {self.bundle.max_seq_len})")

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
