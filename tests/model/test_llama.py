"""The static-cache contract: positions, incremental decode, ragged batches, bounds."""

from __future__ import annotations

import pytest
import torch

from llmexport import LLMExportError
from llmexport.model.kv_cache import KVCache
from llmexport.model.weights import load_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"])
def model(request):
    return load_model(request.param, max_seq_len=64, seed=5)


def _step(model, cache, ids, positions, seq_lens, index=None):
    logits, k, v = model(ids, positions, seq_lens, cache.k, cache.v, logits_index=index)
    cache.update(k, v)
    return logits


@torch.no_grad()
def test_prefill_then_decode_equals_one_prefill(model):
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    full = _step(model, KVCache(model.config, 1, 64), ids, torch.arange(20)[None], torch.tensor([20]))
    cache, n = KVCache(model.config, 1, 64), 12
    parts = [_step(model, cache, ids[:, :n], torch.arange(n)[None], torch.tensor([n]))]
    for pos in range(n, 20):
        parts.append(_step(model, cache, ids[:, pos:pos + 1], torch.tensor([[pos]]), torch.tensor([pos + 1])))
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


@torch.no_grad()
def test_ragged_batch_rows_equal_each_prompt_alone(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 13, 9)]
    width = 13
    ids = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    lengths = torch.tensor([len(p) for p in prompts])
    cache = KVCache(model.config, 3, 64)
    batch = _step(model, cache, ids, torch.arange(width).expand(3, width), lengths, lengths - 1)
    nxt = torch.tensor([[7], [8], [9]])
    batch_decode = _step(model, cache, nxt, lengths[:, None], lengths + 1, torch.zeros(3, dtype=torch.long))
    for row, p in enumerate(prompts):
        alone = KVCache(model.config, 1, 64)
        n = len(p)
        first = _step(model, alone, p[None], torch.arange(n)[None], torch.tensor([n]), torch.tensor([n - 1]))
        second = _step(model, alone, nxt[row:row + 1], torch.tensor([[n]]), torch.tensor([n + 1]),
                       torch.tensor([0]))
        assert (batch[row] - first[0]).abs().max().item() < 1e-5
        assert (batch_decode[row] - second[0]).abs().max().item() < 1e-5


def test_position_beyond_max_seq_len_is_a_clear_error(model):
    cache = KVCache(model.config, 1, 64)
    with pytest.raises(LLMExportError, match="outside the KV cache of max_seq_len=64"):
        model(torch.tensor([[1]]), torch.tensor([[64]]), torch.tensor([65]), cache.k, cache.v)


def test_fewer_cache_buffers_than_layers_is_a_clear_error(model):
    cache = KVCache(model.config, 1, 64)
    with pytest.raises(LLMExportError, match="one of each per layer"):
        model(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([1]), cache.k[:1], cache.v[:1])


def test_max_seq_len_above_model_limit_is_rejected():
    with pytest.raises(LLMExportError, match="max_position_embeddings"):
        load_model("tiny-llama", max_seq_len=10_000)


def test_decode_writes_only_its_own_slot(model):
    cache = KVCache(model.config, 1, 64)
    _step(model, cache, torch.tensor([[1, 2, 3]]), torch.arange(3)[None], torch.tensor([3]))
    before = [k.clone() for k in cache.k]
    _step(model, cache, torch.tensor([[4]]), torch.tensor([[3]]), torch.tensor([4]))
    for old, new in zip(before, cache.k):
        changed = (old != new).any(dim=-1).any(dim=1)[0]  # (T,) slots that changed
        assert changed.nonzero().flatten().tolist() == [3]


def test_in_place_and_functional_ops_agree(model):
    """Eager forward updates the caller's buffers in place; the traced op returns new ones."""
    g = torch.Generator().manual_seed(4)
    d, hkv = model.config.head_dim, model.config.num_kv_heads
    q = torch.randn(2, 5, model.config.num_heads * d, generator=g)
    k, v = torch.randn(2, 5, hkv * d, generator=g), torch.randn(2, 5, hkv * d, generator=g)
    caches = [torch.randn(2, hkv, 64, d, generator=g) for _ in range(2)]
    pos, lens = torch.arange(3, 8).expand(2, 5), torch.tensor([8, 8])
    args = (pos, lens, model.rope_cos, model.rope_sin, d**-0.5, 3)
    out, k_new, v_new = torch.ops.llmexport.attention(q, k, v, *caches, *args)
    assert not torch.equal(k_new, caches[0])  # functional: inputs untouched
    in_place = torch.ops.llmexport.attention_in_place(q, k, v, *caches, *args)
    assert torch.equal(in_place, out) and torch.equal(caches[0], k_new) and torch.equal(caches[1], v_new)
