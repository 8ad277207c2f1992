"""The fused attention operation: RoPE, static-cache write and masked GQA attention as one op.

`llmexport::attention` is a torch custom op so that tracing keeps it as a single node; the
exporter translates that node per target (standard ONNX ops, ONNX Runtime's
GroupQueryAttention, a TensorRT plugin). Its eager body below is the reference math every
translation is checked against. `llmexport::attention_in_place` is the same math writing the
caches in place, which eager execution uses so a decode step never copies the cache.

Shapes (letters used throughout):
  B batch, S new tokens, T cache capacity (max_seq_len), Hq query heads, Hkv key/value heads,
  D head_dim, G = Hq // Hkv query heads per key/value head.
Inputs:
  q (B, S, Hq*D), k and v (B, S, Hkv*D)  projections before RoPE
  k_cache, v_cache (B, Hkv, T, D)         static cache, slots indexed by position
  position_ids (B, S) int64              position (= cache slot) of each new token
  seq_lens (B,) int64                    valid tokens per sequence after this step
  cos, sin (T, D/2)                      rope tables in the model dtype
Outputs: attention output (B, S, Hq*D) and the updated caches (new K/V written at
position_ids; every other slot unchanged).
A query at position p sees cache slots j with j <= p and, with a sliding window W > 0,
p - j < W. The math is defined by positions alone: `seq_lens` only tells fused kernels how
far each sequence's cache is valid. Padded query rows (position >= seq_len) still see their
own slot, so they never turn into NaN that would leak into real rows through 0 * NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the non-interleaved (rotate-half) layout. x (B, H, S, D); cos, sin (B, 1, S, D/2)."""
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def static_mode() -> bool:
    """True while tracing or recording a CUDA graph: no host reads of tensor values allowed."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _attend(q, k, v, k_cache, v_cache, position_ids, cos, sin, scale: float, window: int, in_place: bool):
    """The reference math shared by both ops; returns (out, k_cache, v_cache)."""
    B, S, _ = q.shape
    _, Hkv, T, D = k_cache.shape
    Hq = q.shape[-1] // D
    q = q.view(B, S, Hq, D).transpose(1, 2)  # (B, Hq, S, D)
    k = k.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(B, S, Hkv, D).transpose(1, 2)
    c, s = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)  # (B, 1, S, D/2)
    q, k = rotate(q, c, s), rotate(k, c, s)

    slots = position_ids[:, None, :, None].expand(B, Hkv, S, D)
    if in_place:
        k_cache.scatter_(2, slots, k)  # (B, Hkv, T, D)
        v_cache.scatter_(2, slots, v)
    else:
        k_cache, v_cache = k_cache.scatter(2, slots, k), v_cache.scatter(2, slots, v)

    # Slots past the furthest position are invisible to every query: attend over the valid
    # prefix only, so eager time and memory follow the context, not the cache capacity. (While
    # tracing or capturing a CUDA graph the length cannot be read on the host: use all T.)
    used = T if static_mode() else int(position_ids.max()) + 1
    keys, values = k_cache[:, :, :used], v_cache[:, :, :used]  # (B, Hkv, U, D)
    j = torch.arange(used, device=q.device)
    p = position_ids[:, :, None]  # (B, S, 1)
    visible = j <= p  # (B, S, U)
    if window > 0:
        visible &= p - j < window
    grouped = q.reshape(B, Hkv, Hq // Hkv, S, D)  # (B, Hkv, G, S, D): no copy of the cache per group
    scores = (grouped @ keys.unsqueeze(2).transpose(3, 4) * scale).float()  # (B, Hkv, G, S, U)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = (probs @ values.unsqueeze(2)).reshape(B, Hq, S, D)  # (B, Hq, S, D)
    out = out.transpose(1, 2).reshape(B, S, Hq * D)  # (B, S, Hq*D)
    return out, k_cache, v_cache


@torch.library.custom_op("llmexport::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    position_ids: Tensor, seq_lens: Tensor, cos: Tensor, sin: Tensor,
    scale: float, window: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional: returns new caches. What tracing sees (a pure function to translate)."""
    return _attend(q, k, v, k_cache, v_cache, position_ids, cos, sin, scale, window, in_place=False)


@attention.register_fake
def _(q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin, scale, window):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


@torch.library.custom_op("llmexport::attention_in_place", mutates_args=("k_cache", "v_cache"))
def attention_in_place(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    position_ids: Tensor, seq_lens: Tensor, cos: Tensor, sin: Tensor,
    scale: float, window: int,
) -> Tensor:
    """Writes the new K/V into the caches (no copy); what eager execution uses."""
    return _attend(q, k, v, k_cache, v_cache, position_ids, cos, sin, scale, window, in_place=True)[0]


@attention_in_place.register_fake
def _(q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin, scale, window):
    return torch.empty_like(q)
