"""Per-target translation of the fused attention op (`torch.ops.llmexport.attention`).

Every target lives here and nowhere else:
  portable  standard ai.onnx ops only (runs on any runtime; the cache write is a
            ScatterElements, so the runtime gets a new cache tensor each step)
  ort       ONNX Runtime's com.microsoft::GroupQueryAttention with RoPE fused and past/present
            sharing one buffer (in place), plus ORT's fused RMSNorm ops after optimisation
A `tensorrt` target is added here, next to these.

Shapes as in model/attention.py: B batch, S new tokens, T cache capacity, Hq / Hkv heads,
D head_dim, G = Hq // Hkv.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnxscript
import torch
from onnxscript import opset18 as op

from llmexport import LLMExportError
from llmexport.model.config import ModelConfig

from .contrib_schemas import MS_DOMAIN, register_contrib_schemas

TARGETS = ("portable", "ort")
# dtypes each target's graphs can be built in (verification on CPU needs ONNX Runtime's CPU
# kernels; bfloat16 runs only on CUDA, see README).
TARGET_DTYPES = {"portable": ("float32", "float16"), "ort": ("float32", "float16", "bfloat16")}
_msft = onnxscript.values.Opset(MS_DOMAIN, 1)


def check_target(target: str, dtype: str) -> None:
    if target not in TARGETS:
        raise LLMExportError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype not in TARGET_DTYPES[target]:
        raise LLMExportError(
            f"--dtype {dtype} is not supported by --target {target}; use one of {', '.join(TARGET_DTYPES[target])}"
        )


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _portable(config: ModelConfig) -> Callable:
    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    g, half = hq // hkv, config.head_dim // 2

    def heads(x, n):  # (B, S, n*D) -> (B, n, S, D)
        return op.Transpose(op.Reshape(x, _ints(0, 0, n, d)), perm=[0, 2, 1, 3])

    def rotate(x, cos, sin):  # x (B, H, S, D); cos, sin (B, 1, S, D)
        x1 = op.Slice(x, _ints(0), _ints(half), _ints(3))
        x2 = op.Slice(x, _ints(half), _ints(d), _ints(3))
        return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(x2), x1, axis=3), sin))

    def attention(q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin, scale: float, window: int):
        q, k, v = heads(q, hq), heads(k, hkv), heads(v, hkv)
        c = op.Unsqueeze(op.Gather(cos, position_ids), _ints(1))  # (B, 1, S, D/2)
        s = op.Unsqueeze(op.Gather(sin, position_ids), _ints(1))
        c, s = op.Concat(c, c, axis=3), op.Concat(s, s, axis=3)  # (B, 1, S, D)
        q, k = rotate(q, c, s), rotate(k, c, s)

        slots = op.Expand(op.Unsqueeze(position_ids, _ints(1, 3)), op.Shape(k))  # (B, Hkv, S, D)
        k_cache = op.ScatterElements(k_cache, slots, k, axis=2)  # (B, Hkv, T, D)
        v_cache = op.ScatterElements(v_cache, slots, v, axis=2)

        qg = op.Reshape(q, _ints(0, hkv, g, -1, d))  # (B, Hkv, G, S, D)
        keys = op.Unsqueeze(k_cache, _ints(2))  # (B, Hkv, 1, T, D)
        scores = op.Mul(op.MatMul(qg, op.Transpose(keys, perm=[0, 1, 2, 4, 3])), op.CastLike(scale, q))
        scores = op.Cast(scores, to=onnx.TensorProto.FLOAT)  # (B, Hkv, G, S, T)
        j = op.Range(op.Constant(value_int=0), op.Gather(op.Shape(k_cache), 2, axis=0), op.Constant(value_int=1))
        p = op.Unsqueeze(position_ids, _ints(2))  # (B, S, 1)
        visible = op.LessOrEqual(j, p)  # (B, S, T)
        if window > 0:
            visible = op.And(visible, op.Less(op.Sub(p, j), op.Constant(value_int=window)))
        scores = op.Where(op.Unsqueeze(visible, _ints(1, 2)), scores, op.Constant(value_float=float("-inf")))
        probs = op.CastLike(op.Softmax(scores, axis=-1), q)
        out = op.MatMul(probs, op.Unsqueeze(v_cache, _ints(2)))  # (B, Hkv, G, S, D)
        out = op.Transpose(op.Reshape(out, _ints(0, hq, -1, d)), perm=[0, 2, 1, 3])  # (B, S, Hq, D)
        return op.Reshape(out, _ints(0, 0, hq * d)), k_cache, v_cache

    return attention


def _ort(config: ModelConfig) -> Callable:
    register_contrib_schemas()

    def attention(q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin, scale: float, window: int):
        # GQA derives positions from seqlens_k: a first prompt (S == total) is 0..S-1 per row,
        # later steps continue at seqlens_k. The runtime's position_ids follow the same rule.
        seqlens_k = op.Cast(op.Sub(seq_lens, op.Constant(value_int=1)), to=onnx.TensorProto.INT32)
        total = op.Cast(op.ReduceMax(seq_lens, keepdims=0), to=onnx.TensorProto.INT32)
        return _msft.GroupQueryAttention(
            q, k, v, k_cache, v_cache, seqlens_k, total, cos, sin,
            num_heads=config.num_heads, kv_num_heads=config.num_kv_heads, scale=scale,
            do_rotary=1, rotary_interleaved=0, local_window_size=window if window > 0 else -1, _outputs=3,
        )

    return attention


def translation_table(target: str, config: ModelConfig) -> dict:
    """torch.onnx custom_translation_table for `target`."""
    make = {"portable": _portable, "ort": _ort}[target]
    return {torch.ops.llmexport.attention.default: make(config)}
