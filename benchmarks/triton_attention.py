"""Flash-decoding attention over the static KV cache, in Triton: the kernel meant for the
TensorRT plugin (and the torch CUDA-graph backend).

Decode: one query token per sequence attends to its own cache rows [start, L), where L is the
sequence's valid length (`seq_lens`) and start = max(0, L - window) with a sliding window.
Nothing past L is ever read. The key range is split into chunks processed in parallel
(split-K); each program handles one (sequence, kv head, chunk) and all G = Hq / Hkv query
heads that share that kv head, so each K/V tile is loaded once. A second kernel merges the
chunks' partial softmax results.

Prefill: a block of query tokens of one head per program (flash attention); each query at
position p sees cache rows j <= p (and p - j < window), the reference's rule, and the key loop
stops at the block's highest position.

Correctness is checked here on CPU with Triton's interpreter (TRITON_INTERPRET=1, see
tests/benchmarks/test_triton_attention.py); speed only means something on a GPU (not yet run).

Shapes: B batch, S new tokens, Hq / Hkv heads, G = Hq / Hkv, T cache capacity, D head_dim.
  decode: q (B, Hq, D) after RoPE; seq_lens (B,) int; out (B, Hq, D)
  prefill: q (B, S, Hq, D) after RoPE; position_ids (B, S) int; out (B, S, Hq, D)
  both: k_cache, v_cache (B, Hkv, T, D) with this step's K/V already written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmexport import LLMExportError


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale, window,
             stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, chunk, splits,
             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    lo = tl.maximum(first, s * chunk)
    hi = tl.minimum(length, (s + 1) * chunk)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=(g < G)[:, None], other=0.0)  # (BLOCK_G, D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    base = b * stride_kb + h * stride_kh
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        k = tl.load(k_ptr + base + n[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + base + n[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # (BLOCK_G, BLOCK_N)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    row = (b * tl.num_programs(1) + h) * splits + s
    tl.store(m_ptr + row * BLOCK_G + g, m)
    tl.store(l_ptr + row * BLOCK_G + g, l)
    tl.store(acc_ptr + (row * BLOCK_G + g)[:, None] * D + d[None, :], acc)


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, splits,
             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    sp = tl.arange(0, BLOCK_S)
    base = (b * tl.num_programs(1) + h) * splits
    m_all = tl.load(m_ptr + (base + sp)[:, None] * BLOCK_G + g[None, :], mask=(sp < splits)[:, None],
                    other=float("-inf"))
    top = tl.max(m_all, 0)  # (BLOCK_G,) the largest score over all chunks
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i in range(0, splits):
        m = tl.load(m_ptr + (base + i) * BLOCK_G + g)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # a chunk with no keys weighs 0
        total += weight * tl.load(l_ptr + (base + i) * BLOCK_G + g)
        acc += tl.load(acc_ptr + ((base + i) * BLOCK_G + g)[:, None] * D + d[None, :]) * weight[:, None]
    out = acc / total[:, None]
    tl.store(out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def decode_attention(q, k_cache, v_cache, seq_lens, scale: float, window: int = 0, out=None,
                     chunk: int = 256, block_n: int = 32):
    """Flash-decoding over the static cache; torch tensors on the kernel's device."""
    import torch

    batch, hq, d = q.shape
    _, hkv, t, _ = k_cache.shape
    _check(d, q=q, k_cache=k_cache, v_cache=v_cache, out=out)
    g = hq // hkv
    block_g = max(16, triton.next_power_of_2(g))  # tl.dot needs >= 16 rows
    splits = triton.cdiv(t, chunk)
    out = torch.empty_like(q) if out is None else out
    partial = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(batch * hkv * splits * block_g, **partial)
    l = torch.empty_like(m)
    acc = torch.empty(batch * hkv * splits * block_g * d, **partial)
    _partial[(batch, hkv, splits)](
        q, k_cache, v_cache, seq_lens, m, l, acc, scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), chunk, splits,
        G=g, BLOCK_G=block_g, D=d, BLOCK_N=block_n, PRECISION=_precision(q))
    _combine[(batch, hkv)](m, l, acc, out, out.stride(0), out.stride(1), splits,
                           G=g, BLOCK_G=block_g, D=d, BLOCK_S=triton.next_power_of_2(splits))
    return out


@triton.jit
def _prefill(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, scale, window, seq,
             stride_qb, stride_qs, stride_qh, stride_kb, stride_kh, stride_kt, stride_pb,
             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    b, hq, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = hq // G
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < seq
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + rows[:, None] * stride_qs + hq * stride_qh + d[None, :],
                mask=live[:, None], other=0.0)  # (BLOCK_M, D)
    p = tl.load(pos_ptr + b * stride_pb + rows, mask=live, other=-1)  # (BLOCK_M,) positions
    top = tl.max(p, 0) + 1  # keys this block can see: [0, top)
    bottom = tl.where(window > 0, tl.maximum(tl.min(tl.where(live, p, top), 0) - window + 1, 0), 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    base = b * stride_kb + h * stride_kh
    for start in range((bottom // BLOCK_N) * BLOCK_N, top, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        loadable = n < top
        k = tl.load(k_ptr + base + n[:, None] * stride_kt + d[None, :], mask=loadable[:, None], other=0.0)
        v = tl.load(v_ptr + base + n[:, None] * stride_kt + d[None, :], mask=loadable[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # (BLOCK_M, BLOCK_N)
        visible = (n[None, :] <= p[:, None]) & loadable[None, :]
        visible = visible & ((window <= 0) | (p[:, None] - n[None, :] < window))
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m - m_safe)
        weights = tl.exp(scores - m_safe[:, None])
        l = l * alpha + tl.sum(weights, 1)
        acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + b * stride_qb + rows[:, None] * stride_qs + hq * stride_qh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def prefill_attention(q, k_cache, v_cache, position_ids, scale: float, window: int = 0, out=None,
                      block_m: int = 16, block_n: int = 32):
    """Attention of S new tokens per sequence over the static cache; torch tensors."""
    import torch

    batch, seq, hq, d = q.shape
    hkv = k_cache.shape[1]
    _check(d, q=q, k_cache=k_cache, v_cache=v_cache, out=out)
    if out is not None and out.stride() != q.stride():  # the kernel stores with q's strides
        raise LLMExportError(f"out must have q's strides {q.stride()}, not {out.stride()}")
    out = torch.empty_like(q) if out is None else out
    _prefill[(batch, hq, triton.cdiv(seq, block_m))](
        q, k_cache, v_cache, position_ids, out, scale, window, seq,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        position_ids.stride(0), G=hq // hkv, D=d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q))
    return out


def _precision(q) -> str:
    """tl.dot's input precision: on tensor-core GPUs float32 operands default to TF32 (10-bit
    mantissa); "ieee" keeps float32 attention float32 (Triton's tl.dot documentation). Half
    precision operands are unaffected."""
    import torch

    return "ieee" if q.dtype == torch.float32 else "tf32"


def _check(head_dim: int, **tensors) -> None:
    """What the kernels assume: tl.arange(0, D) needs a power of two (and tl.dot >= 16), and the
    head_dim axis is read with unit stride."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise LLMExportError(f"the Triton attention kernels need a power-of-two head_dim >= 16, not {head_dim}; "
                             f"use the torch attention for this model")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.stride(-1) != 1:
            raise LLMExportError(f"{name} must be contiguous in its last (head_dim) axis; pass {name}.contiguous()")
