"""Reference generation on the torch model: batched prefill, then one token at a time.

This is the oracle every backend's runtime is compared with; it is deliberately simple.
Prompts of different lengths are right-padded into one batch; each keeps its own positions.
"""

from __future__ import annotations

import torch

from llmexport import LLMExportError

from .kv_cache import KVCache
from .llama import LlamaModel


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def reference_generate(
    model: LlamaModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns only the new tokens of each."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LLMExportError("every prompt needs at least one token")
    lengths = torch.tensor([len(p) for p in prompts])
    if int(lengths.max()) + max_new_tokens > model.max_seq_len:
        raise LLMExportError(
            f"prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.max_seq_len}; lower max_new_tokens"
        )
    device = model.lm_head.weight.device
    batch, width = len(prompts), int(lengths.max())
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, : len(p)] = torch.tensor(p)
    position_ids = torch.arange(width).expand(batch, width)  # padding continues past each length
    cache = KVCache(model.config, batch, model.max_seq_len, model.lm_head.weight.dtype, device)
    generator = torch.Generator().manual_seed(seed)

    logits, k, v = model(input_ids.to(device), position_ids.to(device), lengths.to(device),
                         cache.k, cache.v, logits_index=(lengths - 1).to(device))
    cache.update(k, v)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = _pick(logits.cpu(), temperature, top_k, top_p, generator)
        for row in range(batch):
            if not done[row]:
                out[row].append(int(token[row]))
                done[row] = int(token[row]) in eos_token_ids
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        lengths = lengths + 1
        logits, k, v = model(token[:, None].to(device), (lengths - 1)[:, None].to(device), lengths.to(device),
                             cache.k, cache.v, logits_index=torch.zeros(batch, dtype=torch.long, device=device))
        cache.update(k, v)
    return out
