"""The TensorRT path: what runs here (errors, the target's graphs in test_export.py) and what
needs TensorRT (skipped with the reason where it is not installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmexport import LLMExportError
from llmexport.exporter.tensorrt_build import _profile_shapes, build_tensorrt
from llmexport.runtime.backends.tensorrt import INSTALL_HINT
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.session import Session

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is missing")
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (it cannot be here)")


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    from llmexport.exporter.export import export_bundle

    return export_bundle("tiny-llama3", tmp_path_factory.mktemp("trt") / "b", target="tensorrt", dtype="float16",
                         max_seq_len=64, max_batch=4)


@needs_no_tensorrt
def test_build_without_tensorrt_says_what_is_missing(trt_bundle):
    with pytest.raises(LLMExportError) as err:
        build_tensorrt(trt_bundle)
    assert str(err.value) == INSTALL_HINT
    assert json.loads((trt_bundle / "manifest.json").read_text())["engines"] == {}


@needs_no_tensorrt
def test_runtime_backend_without_tensorrt_says_what_is_missing(trt_bundle):
    with pytest.raises(LLMExportError, match="TensorRT is not installed"):
        Session(trt_bundle, backend="tensorrt", device="cuda")


def test_build_needs_a_tensorrt_target_bundle(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with pytest.raises(LLMExportError, match="re-export it with --target tensorrt"):
        build_tensorrt(bundle_dir)


def test_profiles_cover_prefill_and_decode(trt_bundle):
    bundle = Bundle.open(trt_bundle)
    prefill, decode = _profile_shapes(bundle, "prefill"), _profile_shapes(bundle, "decode")
    assert prefill["input_ids"] == ((1, 1), (1, 64), (4, 64))
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["past_key_values.0.key"] == ((1, 2, 64, 16), (4, 2, 64, 16), (4, 2, 64, 16))
    assert set(prefill) == set(decode) == {i.name for i in bundle.manifest.graphs["prefill"].inputs}


@needs_tensorrt
def test_engine_builds_and_is_recorded(trt_bundle):
    engine = build_tensorrt(trt_bundle, optimization_level=0)
    assert engine.is_file() and engine.stat().st_size > 0
    recorded = json.loads((trt_bundle / "manifest.json").read_text())["engines"]["tensorrt"]
    assert recorded["profiles"] == {"prefill": 0, "decode": 1}
    assert (trt_bundle / recorded["timing_cache"]).is_file()
