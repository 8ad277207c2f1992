"""Checkpoint loading: layouts, dtypes, seeded presets, saving, and every bad-checkpoint error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmexport import LLMExportError
from llmexport.model.weights import load_model, open_source, save_pretrained


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_loads_like_the_single_file(llama3_checkpoint, tmp_path):
    tensors = load_file(llama3_checkpoint / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(llama3_checkpoint / "config.json", out)
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, out / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    single, sharded = _state(load_model(llama3_checkpoint)), _state(load_model(out))
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_convert_to_the_requested_dtype(llama3_checkpoint, tmp_path, stored):
    out = _copy(llama3_checkpoint, tmp_path / "half")
    tensors = {k: v.to(stored) for k, v in load_file(out / "model.safetensors").items()}
    save_file(tensors, out / "model.safetensors")
    model = load_model(out, dtype="float32")
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"].float())
    assert load_model(out, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16


def test_presets_are_seeded():
    a, b = _state(load_model("tiny-qwen2", seed=3)), _state(load_model("tiny-qwen2", seed=3))
    c = _state(load_model("tiny-qwen2", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_tied_embeddings_share_one_tensor():
    model = load_model("tiny-qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_pretrained_is_readable_by_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    ours = load_model("tiny-llama3", max_seq_len=64, seed=7)
    save_pretrained(ours, tmp_path / "saved")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    reloaded = load_model(tmp_path / "saved", max_seq_len=64)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    from llmexport.model.kv_cache import KVCache

    cache = KVCache(reloaded.config, 1, 64)
    with torch.no_grad():
        logits, _, _ = reloaded(ids, torch.arange(5)[None], torch.tensor([5]), cache.k, cache.v)
        assert (logits - hf(ids).logits).abs().max().item() < 1e-4


def test_missing_tensor_is_listed(llama3_checkpoint, tmp_path):
    out = _copy(llama3_checkpoint, tmp_path / "missing")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(LLMExportError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        open_source(out)


def test_wrong_shape_and_unexpected_tensors_are_listed(llama3_checkpoint, tmp_path):
    out = _copy(llama3_checkpoint, tmp_path / "shape")
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(63)
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(LLMExportError) as err:
        open_source(out)
    assert "model.norm.weight has shape [63], expected [64]" in str(err.value)
    assert "unexpected model.extra.weight" in str(err.value)


def test_truncated_safetensors_is_a_clear_error(llama3_checkpoint, tmp_path):
    out = _copy(llama3_checkpoint, tmp_path / "truncated")
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LLMExportError, match="corrupt or truncated"):
        load_model(out)


def test_no_safetensors_is_a_clear_error(llama3_checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    shutil.copy(llama3_checkpoint / "config.json", out)
    with pytest.raises(LLMExportError, match=r"no \*\.safetensors"):
        open_source(out)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(LLMExportError, match="unknown preset"):
        open_source("no-such-model")
    with pytest.raises(LLMExportError, match="no config.json"):
        open_source(tmp_path)
