"""Bundles: graphs against the reference, op inventories, shared weights, the manifest contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from llmexport.exporter.contrib_schemas import register_contrib_schemas
from llmexport.exporter.verify import verify_bundle
from llmexport.model.kv_cache import KVCache
from llmexport.model.weights import expected_shapes, load_model
from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from llmexport.runtime.bundle import Bundle, kv
from llmexport.runtime.bundle import names as io

FAMILIES = ["llama2", "llama3", "qwen2"]
TARGETS = ["portable", "ort", "tensorrt"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_16_decode_steps_match_the_reference_fp32(bundle_factory, family, target):
    bundle_dir, ckpt = bundle_factory(family, target)
    reference = load_model(ckpt, max_seq_len=64)  # from the checkpoint, not from the bundle
    lengths = np.array([4, 11, 7])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (3, 11))
    positions = np.tile(np.arange(11), (3, 1))
    cache = KVCache(reference.config, 3, 64)
    with OnnxRuntimeBackend(Bundle.open(bundle_dir), decode_graph=True) as backend, torch.no_grad():
        got = backend.step("prefill", ids, positions, lengths, range(3))
        want, k, v = reference(torch.tensor(ids), torch.tensor(positions), torch.tensor(lengths), cache.k, cache.v,
                               logits_index=torch.tensor(lengths - 1))
        cache.update(k, v)
        for step in range(16):
            assert np.abs(got - want.numpy()).max() < 1e-4, f"step {step}"
            token = want.numpy().argmax(-1)
            assert (got.argmax(-1) == token).all()
            lengths = lengths + 1
            got = backend.step("decode", token[:, None], (lengths - 1)[:, None], lengths, range(3))
            want, k, v = reference(torch.tensor(token)[:, None], torch.tensor(lengths - 1)[:, None],
                                   torch.tensor(lengths), cache.k, cache.v, logits_index=torch.zeros(3, dtype=torch.long))
            cache.update(k, v)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_top1_agreement_on_64_prompts(bundle_factory, family, target):
    bundle_dir, _ = bundle_factory(family, target, "float16")
    report = verify_bundle(bundle_dir, prompts=64, decode_steps=4)
    assert report.ok, report.rows
    assert all(r.top1 >= 0.99 for r in report.rows if r.top1 is not None)


def _ops(path):
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(path, load_external_data=False).graph.node}


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_graphs_use_fused_attention_and_norms(bundle_factory, family):
    bundle_dir, _ = bundle_factory(family, "ort")
    for phase in (io.PREFILL, io.DECODE):
        ops = _ops(bundle_dir / f"{phase}.onnx")
        assert ("com.microsoft", "GroupQueryAttention") in ops
        assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
        assert not {op for _, op in ops} & {"Softmax", "ScatterElements", "ScatterND"}  # no unfused attention


@pytest.mark.parametrize("family", FAMILIES)
def test_portable_graphs_use_only_standard_ops(bundle_factory, family):
    bundle_dir, _ = bundle_factory(family, "portable")
    for phase in (io.PREFILL, io.DECODE):
        assert {domain for domain, _ in _ops(bundle_dir / f"{phase}.onnx")} == {"ai.onnx"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tensorrt_graphs_have_one_plugin_node_per_layer_and_only_parser_ops(bundle_factory, family):
    from llmexport.exporter import attention_function as fn
    from llmexport.exporter.tensorrt_ops import SUPPORTED

    bundle_dir, ckpt = bundle_factory(family, "tensorrt")
    config = load_model(ckpt).config
    for phase in (io.PREFILL, io.DECODE):
        model = onnx.load(bundle_dir / f"{phase}.onnx", load_external_data=False)
        plugins = [n for n in model.graph.node if (n.domain, n.op_type) == (fn.DOMAIN, fn.NAME)]
        assert len(plugins) == config.num_layers
        fields = {a.name: onnx.helper.get_attribute_value(a) for a in plugins[0].attribute}
        assert fields == {"num_heads": 4, "num_kv_heads": config.num_kv_heads, "head_dim": 16,
                          "scale": pytest.approx(0.25), "window": 0}
        assert [(f.domain, f.name) for f in model.functions] == [(fn.DOMAIN, fn.NAME)]  # the body ORT runs
        rest = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
        assert rest <= SUPPORTED, rest - SUPPORTED
        assert {n.domain for n in model.graph.node} <= {"", fn.DOMAIN}


def test_tensorrt_plugin_node_carries_the_sliding_window(tmp_path):
    from llmexport.exporter.export import export_bundle

    bundle = export_bundle("tiny-mistral", tmp_path / "b", target="tensorrt", max_seq_len=32)
    model = onnx.load(bundle / "decode.onnx", load_external_data=False)
    windows = {onnx.helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute
               if n.op_type == "LlmexportAttention" and a.name == "window"}
    assert windows == {8}
    assert verify_bundle(bundle, prompts=4, decode_steps=12).ok  # 12 steps past a window of 8


@pytest.mark.parametrize("target", TARGETS)
def test_onnx_checker_passes_with_external_data(bundle_factory, target):
    bundle_dir, _ = bundle_factory("llama3", target)
    register_contrib_schemas()  # onnx itself has no schemas for ONNX Runtime's contrib ops
    for phase in (io.PREFILL, io.DECODE):
        onnx.checker.check_model(str(bundle_dir / f"{phase}.onnx"), full_check=True)


def test_both_graphs_share_one_weight_file_with_no_tensor_twice(bundle_factory):
    bundle_dir, ckpt = bundle_factory("qwen2", "ort")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    refs = {}
    for phase in (io.PREFILL, io.DECODE):
        graph = onnx.load(bundle_dir / f"{phase}.onnx", load_external_data=False).graph
        external = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e["location"] for e in external.values()} == {io.WEIGHTS_FILE}
        refs[phase] = external
    assert refs[io.PREFILL] == refs[io.DECODE]
    config = load_model(ckpt).config
    assert config.tie_word_embeddings  # the embedding is stored once, under its checkpoint name
    weight_bytes = 4 * sum(int(np.prod(s)) for s in expected_shapes(config).values())
    rope_bytes = 2 * 4 * 64 * config.head_dim // 2
    stored = sum(t["length"] for t in manifest["weights"]["tensors"].values())
    assert stored == weight_bytes + rope_bytes


def test_manifest_describes_the_graphs(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["target"], m["dtype"]) == ("llmexport-bundle", 4, "ort", "float32")
    assert m["limits"] == {"max_batch": 4, "max_seq_len": 64}
    assert m["tokenizer"] == "tokenizer.json" and (bundle_dir / "tokenizer.json").is_file()
    assert m["eos_token_ids"] == [2]
    for phase, seq, logits in ((io.PREFILL, io.SEQUENCE, [io.BATCH, io.PICKED, 256]), (io.DECODE, 1, [io.BATCH, 256])):
        graph = m["graphs"][phase]
        inputs = {i["name"]: i for i in graph["inputs"]}
        assert [i["name"] for i in graph["inputs"]] == [*kv.graph_inputs(2, phase), io.TOTAL_SEQ_LEN]
        assert inputs[io.TOTAL_SEQ_LEN] == {"name": io.TOTAL_SEQ_LEN, "dtype": "int32", "shape": []}
        assert inputs[io.INPUT_IDS] == {"name": io.INPUT_IDS, "dtype": "int64", "shape": [io.BATCH, seq]}
        assert inputs[io.past_key(1)]["shape"] == [io.BATCH, 2, 64, 16]
        outputs = {o["name"]: o for o in graph["outputs"]}
        assert outputs[io.LOGITS] == {"name": io.LOGITS, "dtype": "float32", "shape": logits}
        assert graph["aliases"][io.present_value(1)] == io.past_value(1)
    # The graph files themselves carry the same signature.
    proto = onnx.load(bundle_dir / "decode.onnx", load_external_data=False)
    # GroupQueryAttention's total_sequence_length is the host-fed input, not computed on the device
    # (a device-to-host copy would make the graph uncapturable as a CUDA graph)
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.input[io.GQA_TOTAL_SEQ_LEN_INPUT] == io.TOTAL_SEQ_LEN for n in attention)
    assert not any(n.op_type == "ReduceMax" for n in proto.graph.node)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [io.BATCH, 1]
    assert m["graphs"][io.PREFILL]["inputs"][3] == {"name": io.LOGITS_INDEX, "dtype": "int64",
                                                    "shape": [io.BATCH, io.PICKED]}
