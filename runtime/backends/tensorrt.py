"""TensorRT: the lazy import every TensorRT path goes through, and the runtime backend's status.

TensorRT cannot be installed where this project is developed, so nothing here has run. The
runtime backend (deserialise the bundle's engine, pick profile 0 for prefill and 1 for decode,
bind the KV buffers in place with set_tensor_address, execute_async_v3 on one stream, decode
in a CUDA graph) is not written yet: asking for it says so in one line rather than failing
somewhere inside.
"""

from __future__ import annotations

from llmexport import LLMExportError

INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver); "
                "the TensorRT path is untested, see README")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise LLMExportError(INSTALL_HINT) from None
    return tensorrt


def TensorRTBackend(bundle, device: str = "cuda"):  # noqa: N802  (stands where the class will)
    import_tensorrt()
    raise LLMExportError("the TensorRT runtime backend is not implemented yet; build the engine with "
                         "`llmexport build --backend tensorrt` and run the bundle with --backend onnxruntime")
