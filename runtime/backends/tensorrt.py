"""TensorRT: the lazy import every TensorRT path goes through, and the runtime backend's status.

TensorRT cannot be installed where this project is developed, so nothing here has run. The
runtime backend (deserialise the bundle's engine, pick profile 0 for prefill and 1 for decode,
bind the KV buffers in place with set_tensor_address, execute_async_v3 on one stream, decode
in a CUDA graph) is not written yet: asking for it says so in one line rather than failing
somewhere inside. What is written (copy_row) is UNVERIFIED.
"""

from __future__ import annotations

from llmexport import LLMExportError

from .base import Backend

INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver); "
                "the TensorRT path is untested, see README")
NOT_WRITTEN = ("the TensorRT runtime backend is not implemented yet; build the engine with "
               "`llmexport build --backend tensorrt` and run the bundle with --backend onnxruntime")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise LLMExportError(INSTALL_HINT) from None
    return tensorrt


def _cudart():
    """cuda-python's runtime bindings (TensorRT's own Python samples use them)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise LLMExportError("the TensorRT backend needs cuda-python: pip install cuda-python") from None
    return runtime


class TensorRTBackend(Backend):
    """Stands where the backend will: constructing it says it is not written. It will hold one
    key and one value device buffer per layer, `_caches` (addresses, `(rows, H, S, D)` each,
    `_itemsize` bytes an element), and run on `_stream`."""

    name = "tensorrt"

    def __init__(self, bundle, device: str = "cuda", cache_rows: int | None = None):
        super().__init__(bundle, cache_rows)
        import_tensorrt()
        raise LLMExportError(NOT_WRITTEN)

    def step(self, phase, input_ids, position_ids, seq_lens, rows, copy=True, logits_at=None):
        raise LLMExportError(NOT_WRITTEN)

    def cache_addresses(self) -> list[int]:
        return list(self._caches)

    def cache_arrays(self, rows, length=None):
        raise LLMExportError(NOT_WRITTEN)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """UNVERIFIED: one strided device-to-device copy per buffer: H pieces of length * D elements,
        S * D apart (cudaMemcpy2DAsync), on the backend's stream."""
        self.check_copy_row(src, dst, length)
        if src == dst or not length:
            return
        cudart = _cudart()
        _, heads, slots, dim = self.bundle.kv.shape(1)
        pitch = slots * dim * self._itemsize  # one head's slots
        row = heads * pitch
        for address in self._caches:
            (error,) = cudart.cudaMemcpy2DAsync(address + dst * row, pitch, address + src * row, pitch,
                                                length * dim * self._itemsize, heads,
                                                cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream)
            if error != cudart.cudaError_t.cudaSuccess:
                raise LLMExportError(f"copying cache row {src} to {dst} failed: {error}")
