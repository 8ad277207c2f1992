"""verify --bisect: every layer is probed, a damaged layer is named, float16 overflow is located."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmexport.exporter.bisect import bisect_bundle
from llmexport.exporter.export import export_bundle
from llmexport.exporter.verify import reference_source, verify_bundle
from tests.conftest import run_cli, write_hf_checkpoint

PER_LAYER = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj (input)", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj (input)", "mlp.down_proj"]


@pytest.mark.parametrize("target", ["ort", "portable", "tensorrt"])
@pytest.mark.parametrize("family", ["llama2", "qwen2"])  # qwen2: q/k/v biases and tied embeddings
def test_a_good_bundle_is_probed_at_every_op_of_every_layer_and_agrees(bundle_factory, family, target):
    bundle, _ = bundle_factory(family, target)
    report = bisect_bundle(bundle)
    labels = [p.label for p in report.probes]
    expected = ["model.embed_tokens"]
    for i in range(2):
        expected += [f"model.layers.{i}.{op}" for op in PER_LAYER] + [f"model.layers.{i}"]
    expected += ["model.norm", "lm_head (input)", "lm_head"]
    assert labels == expected
    assert report.first_divergence is None and report.first_overflow is None
    assert max(p.scaled for p in report.probes) < 1e-5


def _damage(bundle, tensor: str) -> None:
    """Scale 64 elements of one stored weight, as a bad disk or a careless edit would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["weights"]["tensors"][tensor]
    data = np.memmap(bundle / "weights.bin", np.float32, "r+", entry["offset"], (entry["length"] // 4,))
    data[:64] *= 5
    data.flush()


def test_a_damaged_layer_is_named_against_the_source_model(bundle_factory, tmp_path):
    good, checkpoint = bundle_factory("llama2", "ort")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _damage(bad, "model.layers.1.self_attn.v_proj.weight.T")
    # Against its own weights the graph is right: both sides read the damaged file.
    assert verify_bundle(bad, prompts=2, decode_steps=2).ok
    source = reference_source(bad, checkpoint)
    assert not verify_bundle(bad, prompts=2, decode_steps=2, source=source).ok
    first = bisect_bundle(bad, source=source).first_divergence
    assert (first.layer, first.label) == ("1", "model.layers.1.self_attn.v_proj")

    result = run_cli("verify", "--bundle", str(bad), "--model", str(checkpoint), "--prompts", "2")
    assert result.returncode == 1
    assert "first divergence: layer 1, at model.layers.1.self_attn.v_proj" in result.stdout
    assert "error: verification failed" in result.stderr


def test_verify_model_must_be_the_exported_model(bundle_factory):
    bundle, _ = bundle_factory("llama2", "ort")
    _, other = bundle_factory("qwen2", "ort")
    result = run_cli("verify", "--bundle", str(bundle), "--model", str(other))
    assert result.returncode == 1
    assert "is not the model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_float16_overflow_is_located(tmp_path):
    """A model whose layer-1 MLP output exceeds float16's range: fine in float32, Inf in a float16
    export. verify fails on the Inf; bisect says where it first appears."""
    checkpoint = write_hf_checkpoint("llama2", tmp_path / "ckpt")
    weights = load_file(checkpoint / "model.safetensors")
    for name in ("up_proj", "down_proj"):  # weights stay within float16 (|w| < 300), products do not
        weights[f"model.layers.1.mlp.{name}.weight"] *= 300
    save_file({k: v.contiguous() for k, v in weights.items()}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})
    bundle = export_bundle(checkpoint, tmp_path / "fp16", dtype="float16", max_seq_len=64, max_batch=4)
    assert not verify_bundle(bundle, prompts=2, decode_steps=2).ok
    report = bisect_bundle(bundle)
    overflow = report.first_overflow
    assert (overflow.layer, overflow.label) == ("1", "model.layers.1.mlp.down_proj")
    assert all(not p.overflow for p in report.probes[:report.probes.index(overflow)])
    # The reference itself is finite there: the overflow is the float16 graph's.
    assert np.isfinite(overflow.max_ref) and overflow.max_ref > 65504
    assert torch.finfo(torch.float16).max == 65504
