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


def test_checkpoint_tensors_are_read_without_mapping_the_file(tmp_path):
    """Plain reads, equal to safetensors' own: a mapping would keep a shard's touched pages
    resident (5.3 GiB peak on a sharded llama-2-7b); a cut-off file is a clear error."""
    import os

    from safetensors.torch import save_file

    from llmexport.model.weights import _read_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "m.safetensors")
    reader = _read_safetensors(tmp_path / "m.safetensors", ["c", "a", "b", "empty"])
    name, first = next(reader)
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert str(tmp_path / "m.safetensors") not in maps
    got = {name: first, **dict(reader)}
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in tensors.items())
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(LLMExportError, match="does not fit its shape or the file; the file is corrupt"):
        list(_read_safetensors(tmp_path / "cut.safetensors", ["a", "b", "c"]))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(LLMExportError, match="no safetensors header"):
        list(_read_safetensors(tmp_path / "junk.safetensors", ["a"]))
