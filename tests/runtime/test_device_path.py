"""The GPU path's own code, run on CPU: ONNX Runtime allocates every buffer (OrtValues bound by
address), reads the weights itself into one session that runs both phases, and decode runs
under gpu_graph_ids with inputs at fixed addresses (the CPU provider ignores the id). A mistake
of the kind issue #14 found (add_initializer given buffers ONNX Runtime owns) fails here."""

from __future__ import annotations

import numpy as np
import pytest

from llmexport import LLMExportError
from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend, create_session
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.engine import Engine
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

WORK = [([5, 6, 7], 9), ([40, 41, 42, 43, 44, 45, 46], 5), ([9], 12), ([100, 101], 7), ([7, 7, 7, 7], 3)]


def _tokens(engine: Engine) -> list[list[int]]:
    requests = [engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in WORK]
    while engine.busy:
        engine.step()
    return [r.tokens for r in requests]


@pytest.mark.parametrize("target, dtype", [("ort", "float32"), ("ort", "float16"), ("portable", "float32")])
@pytest.mark.parametrize("graph", [False, True])
def test_device_path_on_cpu_gives_the_host_paths_tokens(bundle_factory, target, dtype, graph):
    bundle_dir, _ = bundle_factory("llama3", target, dtype)
    with Session(bundle_dir) as session:
        want = _tokens(session.engine)
    backend = OnnxRuntimeBackend(Bundle.open(bundle_dir), "cpu", device_path=True, cuda_graph=graph)
    try:
        assert backend.device_path and backend._weights == {}  # ONNX Runtime read weights.bin itself
        assert backend._sessions["decode"] is backend._sessions["prefill"]  # one session, one weight copy
        assert all(type(b).__name__ == "OrtValue" for caches in backend._caches for b in caches)
        addresses = backend.cache_addresses()
        assert _tokens(Engine(backend)) == want
        assert backend.cache_addresses() == addresses
        if graph:  # decode ran on fixed input buffers, one set per window size
            assert set(backend._captured_inputs) <= {1, 2, 4}
    finally:
        backend.close()


def test_capture_ids_are_distinct_per_window_and_cache_set(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "portable")
    backend = OnnxRuntimeBackend(Bundle.open(bundle_dir), "cpu", device_path=True, cuda_graph=True)
    try:
        ids = [backend.capture_id(range(start, start + n), s) for n in (1, 2, 4) for start in range(0, 5 - n)
               for s in (0, 1)]
        assert len(set(ids)) == len(ids) and min(ids) >= 1
    finally:
        backend.close()


def test_onnxruntime_owned_buffers_cannot_be_initializers(bundle_factory):
    """Why the device path lets ONNX Runtime read the weights: add_initializer refuses a buffer
    ONNX Runtime allocated (the old CUDA code made exactly such copies of every weight)."""
    import onnxruntime as ort

    bundle_dir, _ = bundle_factory("llama3", "ort")
    bundle = Bundle.open(bundle_dir)
    name, array = next(iter(bundle.weights.items()))
    owned = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, "cpu", 0)
    with pytest.raises(Exception, match="must be owned by the user"):
        create_session(bundle, {name: owned}, bundle.graph_path("prefill"))


def test_bfloat16_bundles_say_where_they_run(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort", "bfloat16")
    with pytest.raises(LLMExportError, match="no bfloat16 MatMul; run this bundle with --device cuda"):
        OnnxRuntimeBackend(Bundle.open(bundle_dir), "cpu")


def test_device_path_has_no_decode_graph_session(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with pytest.raises(LLMExportError, match="one session of the prefill graph"):
        OnnxRuntimeBackend(Bundle.open(bundle_dir), "cpu", device_path=True, decode_graph=True)


def test_device_path_reads_back_caches(bundle_factory):
    """cache_arrays goes through ONNX Runtime's buffers: the rows written equal the host path's."""
    bundle_dir, _ = bundle_factory("llama3", "portable")
    ids, positions, lens = np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), np.array([3])
    arrays = []
    for device_path in (False, True):
        backend = OnnxRuntimeBackend(Bundle.open(bundle_dir), "cpu", device_path=device_path)
        try:
            backend.step("prefill", ids, positions, lens, range(1, 2))
            arrays.append(backend.cache_arrays(range(1, 2), 3))
        finally:
            backend.close()
    assert all(np.array_equal(a, b) for a, b in zip(*arrays))
