"""The reference model against transformers on the same saved weights (fp32)."""

from __future__ import annotations

import torch

from llmexport.model.generate import reference_generate
from llmexport.model.kv_cache import KVCache
from llmexport.model.weights import load_model


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _all_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = KVCache(model.config, ids.shape[0], model.max_seq_len)
    s = ids.shape[1]
    logits, _, _ = model(ids, torch.arange(s).expand(ids.shape[0], s), torch.full((ids.shape[0],), s),
                         cache.k, cache.v)
    return logits


@torch.no_grad()
def test_logits_match_transformers(hf_checkpoint):
    family, path = hf_checkpoint
    ours, hf = load_model(path, max_seq_len=128), _hf(path)
    g = torch.Generator().manual_seed(1)
    for length in (1, 7, 40):
        ids = torch.randint(0, 256, (2, length), generator=g)
        diff = (_all_logits(ours, ids) - hf(ids).logits).abs().max().item()
        assert diff < 1e-4, f"{family} length {length}: max |diff| {diff}"


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(hf_checkpoint):
    family, path = hf_checkpoint
    ours, hf = load_model(path, max_seq_len=128), _hf(path)
    g = torch.Generator().manual_seed(2)
    for length in (3, 11):
        ids = torch.randint(3, 256, (1, length), generator=g)
        expected = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               attention_mask=torch.ones_like(ids), pad_token_id=0)[0, length:].tolist()
        assert reference_generate(ours, [ids[0].tolist()], 32) == [expected], family


@torch.no_grad()
def test_sliding_window_matches_transformers(make_hf_checkpoint):
    path = make_hf_checkpoint("mistral")
    ours, hf = load_model(path, max_seq_len=64), _hf(path)
    assert ours.config.sliding_window == 8
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    assert (_all_logits(ours, ids) - hf(ids).logits).abs().max().item() < 1e-4
