"""The old home of the ONNX Runtime backend, kept only for tests/runtime/test_session.py, which
is being edited elsewhere; import llmexport.runtime.backends.onnxruntime instead. Remove with its
last use."""

from .backends.onnxruntime import OnnxRuntimeBackend, create_session, ort_weights, session_error

__all__ = ["OnnxRuntimeBackend", "create_session", "ort_weights", "session_error"]
