"""The KV layout (runtime/bundle/kv.py) is the one spelling of the cache: the manifest record, the
graphs' cache inputs and outputs, and every backend's buffers follow it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from llmexport.runtime.backends.torch import TorchBackend
from llmexport.runtime.bundle import Bundle, KVLayout, kv
from llmexport.runtime.bundle import names as io


def test_flat_lists_interleave_each_layers_key_and_value():
    assert kv.interleave(["k0", "k1"], ["v0", "v1"]) == ["k0", "v0", "k1", "v1"]
    assert kv.split(["k0", "v0", "k1", "v1"]) == (["k0", "k1"], ["v0", "v1"])
    assert kv.cache_inputs(2) == [io.past_key(0), io.past_value(0), io.past_key(1), io.past_value(1)]
    assert kv.graph_outputs(1) == [io.LOGITS, io.present_key(0), io.present_value(0)]


@pytest.mark.parametrize("target, in_place", [("ort", True), ("portable", False)])
def test_the_manifest_cache_record_is_the_layouts(bundle_factory, target, in_place):
    bundle_dir, _ = bundle_factory("llama3", target)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    layout = Bundle.open(bundle_dir).kv
    assert layout == KVLayout(num_layers=2, kv_heads=2, max_seq_len=64, head_dim=16, in_place=in_place)
    assert layout.to_dict(manifest["dtype"]) == manifest["cache"]
    for phase in (io.PREFILL, io.DECODE):
        graph = manifest["graphs"][phase]
        assert [i["name"] for i in graph["inputs"] if i["name"] in layout.inputs] == layout.inputs
        assert [o["name"] for o in graph["outputs"]][1:] == layout.outputs
        assert graph["aliases"] == layout.aliases


def test_backends_hold_their_buffers_in_the_layouts_order(bundle_factory):
    """The same prompt prefilled on ONNX Runtime and the torch reference gives the same caches,
    buffer by buffer (the torch backend once listed every key before every value)."""
    bundle = Bundle.open(bundle_factory("llama3", "ort")[0])
    ids = np.array([[5, 17, 33, 9]])
    caches = []
    for make in (OnnxRuntimeBackend, TorchBackend):
        with make(bundle, cache_rows=1) as backend:
            backend.step(io.PREFILL, ids, np.arange(4)[None], np.array([4]), range(1))
            caches.append(backend.cache_arrays(range(1), 4))
            assert len(backend.cache_addresses()) == bundle.kv.buffers
    assert len(caches[0]) == len(caches[1]) == bundle.kv.buffers
    for got, want in zip(*caches):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
