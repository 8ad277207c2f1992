"""Bad bundles and bad requests: clear errors, and the session stays usable afterwards."""

from __future__ import annotations

import json
import shutil

import pytest

from llmexport import LLMExportError
from llmexport.runtime.bundle.manifest import store
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

OK = SamplingParams(max_new_tokens=3, ignore_eos=True)


@pytest.fixture
def broken_copy(bundle_factory, tmp_path):
    def make():
        bundle_dir, _ = bundle_factory("llama3", "ort")
        return shutil.copytree(bundle_dir, tmp_path / "copy")
    return make


def test_missing_bundle(tmp_path):
    with pytest.raises(LLMExportError, match="does not exist"):
        Session(tmp_path / "nowhere")


def test_missing_graph_file(broken_copy):
    bundle = broken_copy()
    (bundle / "decode.onnx").unlink()
    with pytest.raises(LLMExportError, match="missing decode.onnx"):
        Session(bundle)


def _point(bundle, field: list[str], value: str) -> None:
    """Edit the manifest as an attacker would: consistently, with its own digest recomputed
    (a digest is not a signature), so only the path rule stands in the way."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    node = manifest
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    store(bundle, manifest)


@pytest.mark.parametrize("field", [["weights", "file"], ["tokenizer"], ["graphs", "decode", "file"]])
@pytest.mark.parametrize("escape", ["../outside.bin", "/etc/passwd", "link-out"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_manifest_paths_cannot_leave_the_bundle(broken_copy, tmp_path, field, escape, backend):
    bundle = broken_copy()
    outside = tmp_path / "outside.bin"
    shutil.copy(bundle / "weights.bin", outside)  # a real file, so only the path check can refuse it
    (bundle / "link-out").symlink_to(outside)
    _point(bundle, field, escape)
    with pytest.raises(LLMExportError, match="only relative paths inside the bundle|resolves outside the bundle"):
        Session(bundle, backend=backend)


@pytest.mark.parametrize("graph", ["prefill.onnx", "decode.onnx"])  # decode.onnx too: CPU never runs it
def test_corrupt_graph_file(broken_copy, graph):
    bundle = broken_copy()
    size = (bundle / graph).stat().st_size
    (bundle / graph).write_bytes((b"not a protobuf" * size)[:size])  # same size: only parsing can tell
    with pytest.raises(LLMExportError, match=f"cannot parse .*{graph}.*damaged"):
        Session(bundle)


def test_truncated_weights(broken_copy):
    bundle = broken_copy()
    data = (bundle / "weights.bin").read_bytes()
    (bundle / "weights.bin").write_bytes(data[:1000])
    with pytest.raises(LLMExportError, match="truncated"):
        Session(bundle)


def test_manifest_version_mismatch(broken_copy):
    bundle = broken_copy()
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(LLMExportError, match="format version 99"):
        Session(bundle)


def test_corrupt_manifest(broken_copy):
    bundle = broken_copy()
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(LLMExportError, match="cannot read"):
        Session(bundle)


@pytest.mark.parametrize("prompts, message", [
    ([list(range(3, 70))], "exceeds the bundle's max_seq_len=64"),
    ([[]], "empty prompt"),
    ([[1]] * 5, "exceeds the bundle's max_batch=4"),
    ([[1, 256]], r"outside the vocabulary \(0..255\)"),
    ([[-1]], "outside the vocabulary"),
])
def test_bad_requests_leave_the_session_usable(bundle_factory, prompts, message):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir) as session:
        expected = session.generate([[5, 6, 7]], OK).token_ids
        with pytest.raises(LLMExportError, match=message):
            session.generate(prompts, OK)
        assert session.engine.rows.in_use == 0
        assert session.generate([[5, 6, 7]], OK).token_ids == expected


def test_abandoned_stream_frees_its_rows(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir) as session:
        stream = session.stream([[5, 6, 7]] * 4, SamplingParams(max_new_tokens=10, ignore_eos=True))
        next(stream)
        stream.close()
        assert session.engine.rows.in_use == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k=-2"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
])
def test_invalid_sampling_parameters(kwargs, message):
    with pytest.raises(LLMExportError, match=message):
        SamplingParams(**kwargs)


def test_unknown_backend(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with pytest.raises(LLMExportError, match="unknown backend 'nope'"):
        Session(bundle_dir, backend="nope")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_step_past_the_cache_is_a_clear_error(bundle_factory, backend):
    import numpy as np

    from llmexport.runtime.bundle import Bundle
    from llmexport.runtime.session import create_backend

    bundle_dir, _ = bundle_factory("llama3", "ort")
    with create_backend(Bundle.open(bundle_dir), backend) as b:
        with pytest.raises(LLMExportError, match="sequence length 65 exceeds the bundle's max_seq_len=64"):
            b.step("decode", np.zeros((1, 1), np.int64), np.array([[64]]), np.array([65]), range(1))
        with pytest.raises(LLMExportError, match="outside the 4 allocated rows"):
            b.step("decode", np.zeros((1, 1), np.int64), np.array([[1]]), np.array([2]), range(4, 5))


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda", "no float32 kernel"),  # checked before looking for a GPU: true on every machine
])
def test_device_errors_name_the_fix(bundle_factory, device, message):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with pytest.raises(LLMExportError, match=message):
        Session(bundle_dir, device=device)


def test_session_failures_say_what_they_are():
    """Only a file ONNX Runtime cannot parse is called corrupt; a missing kernel or a device
    problem says so (re-exporting would not help)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llmexport.runtime.backends.onnxruntime import session_error

    node = helper.make_node("Erf", ["x"], ["y"])  # valid ONNX, but ONNX Runtime's CPU has no double kernel
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    failures = {}
    for name, data in (("kernel", model.SerializeToString()), ("parse", b"not a protobuf")):
        with pytest.raises(Exception) as raised:
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        failures[name] = raised.value
    kernel = str(session_error(failures["kernel"], "g.onnx", "cpu"))
    assert "has no cpu kernel for an op of g.onnx" in kernel and "corrupt" not in kernel
    assert "the file is corrupt, re-export" in str(session_error(failures["parse"], "g.onnx", "cpu"))
    failures["device"] = RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
    device = str(session_error(failures["device"], "decode.onnx", "cuda"))
    assert "could not set up decode.onnx on cuda" in device and "driver" in device and "corrupt" not in device
