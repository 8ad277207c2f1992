"""Per-target translation of the fused attention op (`torch.ops.llmexport.attention`).

Every target lives here and nowhere else:
  portable  standard ai.onnx ops only (runs on any runtime; the cache write is a
            ScatterElements, so the runtime gets a new cache tensor each step): the
            `llmexport::LlmexportAttention` local function, inlined
  tensorrt  the same node with its local function kept: ONNX Runtime runs the body, TensorRT
            swaps in the plugin of the same name (exporter/attention_function.py)
  ort       ONNX Runtime's com.microsoft::GroupQueryAttention with RoPE fused and past/present
            sharing one buffer (in place), plus ORT's fused RMSNorm ops after optimisation

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
from llmexport.runtime.bundle import names as io

from . import attention_function
from .contrib_schemas import MS_DOMAIN, register_contrib_schemas

TARGETS = ("portable", "ort", "tensorrt")
# dtypes each target's graphs can be built in (verification on CPU needs ONNX Runtime's CPU
# kernels; bfloat16 runs only on CUDA, see README).
TARGET_DTYPES = {"portable": ("float32", "float16"), "ort": ("float32", "float16", "bfloat16"),
                 "tensorrt": ("float32", "float16", "bfloat16")}
_msft = onnxscript.values.Opset(MS_DOMAIN, 1)
_llmexport = onnxscript.values.Opset(attention_function.DOMAIN, 1)


def writes_cache_in_place(target: str) -> bool:
    """Whether `target`'s graphs write new cache slots into the past buffer (the KV layout's
    in_place): GroupQueryAttention shares past and present; the others return new tensors."""
    return target == "ort"


def graph_phases(target: str) -> tuple[str, ...]:
    """The graphs a `target` bundle carries: prefill and decode, and on `ort` also onnxruntime-genai's
    decoder (genai.onnx: genai shares one past/present buffer, which GroupQueryAttention's in-place
    write, the `ort` attention, needs)."""
    return (io.PREFILL, io.DECODE, io.GENAI) if target == "ort" else (io.PREFILL, io.DECODE)


def check_target(target: str, dtype: str) -> None:
    if target not in TARGETS:
        raise LLMExportError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype not in TARGET_DTYPES[target]:
        raise LLMExportError(
            f"--dtype {dtype} is not supported by --target {target}; use one of {', '.join(TARGET_DTYPES[target])}"
        )


def _local_function(config: ModelConfig) -> Callable:
    """One `llmexport::LlmexportAttention` node per layer; its body is a local function
    (exporter/attention_function.py) that `portable` inlines and `tensorrt` keeps."""
    register_contrib_schemas()

    def attention(q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin, scale: float, window: int):
        return _llmexport.LlmexportAttention(
            q, k, v, k_cache, v_cache, position_ids, seq_lens, cos, sin,
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            scale=scale, window=window, _outputs=3,
        )

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
    make = {"portable": _local_function, "tensorrt": _local_function, "ort": _ort}[target]
    return {torch.ops.llmexport.attention.default: make(config)}
