"""onnxruntime-genai's own runtime runs `ort` bundles: genai.onnx (its decoder contract) and
genai_config.json beside our graphs, reading the same weights.bin. Its greedy tokens, one prompt
and a right-padded batch, equal llmexport's Session's, float32 and int4, on every family."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from llmexport import LLMExportError
from llmexport.exporter.genai_graph import GenaiGraph
from llmexport.exporter.quantize import QuantConfig
from llmexport.exporter.verify import verify_bundle
from llmexport.runtime.bundle import Bundle, kv
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.genai import genai_config
from llmexport.runtime.bundle.manifest import Generation
from tests.genai_runtime import genai_greedy, ours_greedy, same_until_eos

pytest.importorskip("onnxruntime_genai")

FAMILIES = ["llama2", "llama3", "qwen2", "mistral"]  # mistral: a sliding window (8) shorter than the prompts
QUANTS = {"float32": None, "int4": QuantConfig("int4")}
# Every family in both: int4 changes the graph's linear layers and tables (llama2: its own LM head;
# qwen2: biases, one packed table read by the gather and the LM head), llama3 and mistral add rope
# scaling and the window on top of them.
CASES = [(family, quant) for quant in QUANTS for family in FAMILIES]
PAD = 2  # the tiny checkpoints' pad_token_id (their EOS, in genai_config.json): genai right-pads batches with it
PROMPTS = [[40, 3, 91, 17, 200, 64, 5, 6, 7, 8, 9, 10], [5, 6, 7], [11, 250, 33, 9, 1, 80, 12]]  # none ends in PAD
NEW_TOKENS = 12


def _bundle(bundle_factory, family, quant):
    extra = {"quant": QUANTS[quant]} if QUANTS[quant] else {}
    return bundle_factory(family, "ort", **extra)[0]


@pytest.mark.parametrize("family, quant", CASES)
def test_genai_greedy_tokens_equal_ours_alone_and_batched(bundle_factory, family, quant):
    bundle_dir = _bundle(bundle_factory, family, quant)
    eos = Bundle.open(bundle_dir).eos_token_ids
    ours = ours_greedy(bundle_dir, PROMPTS, NEW_TOKENS)
    assert len(ours[0]) == NEW_TOKENS  # long enough to decode past mistral's window
    for prompt, want in zip(PROMPTS, ours, strict=True):
        assert same_until_eos(genai_greedy(bundle_dir, [prompt], NEW_TOKENS)[0], want, eos)
    for got, want in zip(genai_greedy(bundle_dir, PROMPTS, NEW_TOKENS), ours, strict=True):
        assert same_until_eos(got, want, eos)


def test_genai_config_describes_the_graph_and_the_checkpoint(bundle_factory):
    bundle_dir, _ = bundle_factory("qwen2", "ort")
    bundle = Bundle.open(bundle_dir)
    config = json.loads((bundle_dir / io.GENAI_CONFIG).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert (model["type"], model["vocab_size"], model["context_length"]) == ("qwen2", 256, 64)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, PAD)
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (2, 4, 2, 16, 64)
    assert config["search"]["past_present_share_buffer"] and config["search"]["max_length"] == 64
    assert not config["search"]["do_sample"]  # no sampling defaults in the checkpoint: greedy
    graph = onnx.load(bundle_dir / decoder["filename"], load_external_data=False).graph
    assert [i.name for i in graph.input] == [decoder["inputs"]["input_ids"], decoder["inputs"]["attention_mask"],
                                             *(decoder["inputs"][f"past_{kind}_names"] % i
                                               for i in range(2) for kind in ("key", "value"))]
    assert [o.name for o in graph.output] == [decoder["outputs"]["logits"],
                                              *(decoder["outputs"][f"present_{kind}_names"] % i
                                                for i in range(2) for kind in ("key", "value"))]
    assert [i.name for i in graph.input] == kv.graph_inputs(2, io.GENAI)
    record = bundle.manifest.graphs[io.GENAI]
    assert [t.shape for t in record.outputs[:2]] == [(io.BATCH, 1, 256), (io.BATCH, 2, io.MAX_LENGTH, 16)]
    assert record.aliases == bundle.kv.aliases


def test_genai_search_defaults_follow_generation_config(bundle_factory):
    manifest = Bundle.open(bundle_factory("qwen2", "ort")[0]).manifest
    sampling = Generation("generation_config.json", {"temperature": 0.7, "top_k": 0, "top_p": 0.8,
                                                     "repetition_penalty": 1.1})
    config = genai_config(replace(manifest, generation=sampling, eos_token_ids=(7, 2)), {"pad_token_id": 0})
    assert config["search"].items() >= {"do_sample": True, "temperature": 0.7, "top_k": 256, "top_p": 0.8,
                                        "repetition_penalty": 1.1}.items()  # top_k 0 (off): the whole vocabulary
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == ([7, 2], 0)
    assert genai_config(manifest, {})["model"]["pad_token_id"] == 2  # no pad_token_id: the first EOS id


def test_genai_graph_reads_the_same_weights_bin_and_is_small(bundle_factory):
    bundle_dir = _bundle(bundle_factory, "qwen2", "int4")

    def external(phase):
        graph = onnx.load(bundle_dir / f"{phase}.onnx", load_external_data=False).graph
        assert not [t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                    and np.prod(t.dims) > 1024]
        return {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}

    assert external(io.GENAI) == external(io.PREFILL)  # every weight, at the same bytes of weights.bin
    ops = {n.op_type for n in onnx.load(bundle_dir / "genai.onnx", load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} <= ops
    assert (bundle_dir / "genai.onnx").stat().st_size < (bundle_dir / "weights.bin").stat().st_size / 10


def test_the_genai_files_are_named_and_hashed_by_the_manifest(bundle_factory, tmp_path):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    bundle = Bundle.open(bundle_dir)
    assert {"genai.onnx", io.GENAI_CONFIG} <= set(bundle.named_files()) <= set(bundle.manifest.integrity.files)
    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    config = (copy / io.GENAI_CONFIG).read_bytes()
    (copy / io.GENAI_CONFIG).write_bytes(config.replace(b'"eos_token_id": 2', b'"eos_token_id": 3'))
    with pytest.raises(LLMExportError, match=f"sha256 mismatch in {io.GENAI_CONFIG}"):
        Bundle.open(copy, check_integrity=True)


@pytest.mark.parametrize("target", ["portable", "tensorrt"])
def test_other_targets_carry_no_genai_files(bundle_factory, target):
    bundle_dir, _ = bundle_factory("llama3", target)
    manifest = Bundle.open(bundle_dir).manifest
    assert io.GENAI not in manifest.graphs and manifest.genai_config is None
    assert not (bundle_dir / "genai.onnx").exists() and not (bundle_dir / io.GENAI_CONFIG).exists()


def test_verify_checks_the_genai_graph(bundle_factory):
    bundle_dir, _ = bundle_factory("mistral", "ort")
    report = verify_bundle(bundle_dir, prompts=4, decode_steps=12)
    assert report.ok, report.rows
    assert {"logits (genai prefill)", "logits (genai decode)"} <= {r.output for r in report.rows}


def test_verify_fails_on_a_wrong_genai_graph(bundle_factory, tmp_path):
    copy = shutil.copytree(bundle_factory("llama3", "ort")[0], tmp_path / "copy")
    graph = onnx.load(copy / "genai.onnx", load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == "GroupQueryAttention":
            next(a for a in node.attribute if a.name == "scale").f = 1.0  # wrong softmax scale, same file size
    onnx.save(graph, copy / "genai.onnx")
    ok = {r.output: r.ok for r in verify_bundle(copy, prompts=4, decode_steps=4).rows}
    assert ok["logits (prefill)"] and ok["logits (decode)"]
    assert not ok["logits (genai prefill)"] and not ok["logits (genai decode)"]


def test_the_genai_graph_takes_a_cache_shorter_than_max_seq_len(bundle_factory):
    """genai sizes the caches by search.max_length: any length up to max_seq_len."""
    bundle = Bundle.open(bundle_factory("llama3", "ort")[0])
    short, full = GenaiGraph(bundle, 1, 8), GenaiGraph(bundle, 1, 64)
    ids = np.array([[5, 6, 7, 8]])
    mask = np.ones((1, 4), np.int64)
    first = short.step(ids, mask), full.step(ids, mask)
    assert np.allclose(*first, atol=1e-5)
    mask = np.ones((1, 5), np.int64)
    assert np.allclose(short.step(ids[:, :1], mask), full.step(ids[:, :1], mask), atol=1e-5)
