"""genai.onnx driven as onnxruntime-genai drives it, in ONNX Runtime alone: what `verify` checks.

onnxruntime-genai feeds the ids of a step and an attention mask as wide as every token held so
far (right-padded prompts: 0 after each row's end; then one more column of ones per decode
step), and binds each layer's past and present to one buffer of max_length slots. This does
the same with numpy buffers of `slots` slots, so the graph's own plumbing (seq_lens, positions,
total_sequence_length and the picked logits, all derived from the mask) is checked against the
reference without onnxruntime-genai installed. Weights are the bundle's memory map, unprepacked,
as verify's other session has them.
"""

from __future__ import annotations

import numpy as np

from llmexport import LLMExportError
from llmexport.runtime.backends.onnxruntime import create_session, ort_weights
from llmexport.runtime.bundle import NUMPY_DTYPES, Bundle
from llmexport.runtime.bundle import names as io


class GenaiGraph:
    def __init__(self, bundle: Bundle, rows: int, slots: int, threads: int | None = None):
        if io.GENAI not in bundle.manifest.graphs:
            raise LLMExportError(f"{bundle.path} has no genai graph (only `--target ort` bundles carry one)")
        self._kv = bundle.kv
        self._weights = ort_weights(bundle)
        self._session = create_session(bundle, self._weights, bundle.graph_path(io.GENAI), threads=threads,
                                       prepack=False)
        self._vocab = bundle.vocab_size
        _, heads, _, dim = self._kv.shape(rows)
        self._caches = [np.zeros((rows, heads, slots, dim), NUMPY_DTYPES[bundle.dtype])
                        for _ in range(self._kv.buffers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids (B, S), attention_mask (B, total) of the first B cache rows -> logits (B, V) at
        each row's last real token; the caches are written in place."""
        batch = input_ids.shape[0]
        binding = self._session.io_binding()
        binding.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(io.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        logits = np.empty((batch, 1, self._vocab), np.float32)  # (B, 1, V)
        binding.bind_output(io.LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        shape = (batch, *self._caches[0].shape[1:])  # the first B rows: rows are contiguous
        for past, present, buffer in zip(self._kv.inputs, self._kv.outputs, self._caches, strict=True):
            binding.bind_input(past, "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises untyped errors
            raise LLMExportError(f"onnxruntime failed running genai.onnx: {str(e).strip().splitlines()[-1]}") from None
        return logits[:, 0]

    def close(self) -> None:
        self._session = None
        self._caches.clear()
        self._weights.clear()
