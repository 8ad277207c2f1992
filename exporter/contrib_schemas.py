"""onnx-side schemas for the non-standard ops our graphs use.

The onnx package knows only standard ops; graph building and `onnx.checker` need a schema for
each other op. The ONNX Runtime contrib ops mirror its ContribOperators.md (inputs, types,
attributes); `llmexport::LlmexportAttention` is our fused attention (a local function).
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

MS_DOMAIN = "com.microsoft"
_P, _A = OpSchema.FormalParameter, OpSchema.Attribute
_OPT = OpSchema.FormalParameterOption.Optional
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _attrs(**kinds: OpSchema.AttrType) -> list:
    return [_A(name, kind, "", required=False) for name, kind in kinds.items()]


_INT, _FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
_SCHEMAS = [
    OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1,
        inputs=[_P("query", "T"), _P("key", "T", param_option=_OPT), _P("value", "T", param_option=_OPT),
                _P("past_key", "T", param_option=_OPT), _P("past_value", "T", param_option=_OPT),
                _P("seqlens_k", "M"), _P("total_sequence_length", "M"),
                _P("cos_cache", "T", param_option=_OPT), _P("sin_cache", "T", param_option=_OPT)],
        outputs=[_P("output", "T"), _P("present_key", "T"), _P("present_value", "T")],
        type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int32)"], "")],
        attributes=_attrs(num_heads=_INT, kv_num_heads=_INT, scale=_FLOAT, do_rotary=_INT,
                          rotary_interleaved=_INT, local_window_size=_INT),
    ),
    # ORT registers SimplifiedLayerNormalization (RMSNorm) in the default domain.
    OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[_P("X", "T"), _P("scale", "V")],
        outputs=[_P("Y", "V"), _P("inv_std_var", "U", param_option=_OPT)],
        type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], ""), ("V", _FLOATS, "")],
        attributes=_attrs(axis=_INT, epsilon=_FLOAT, stash_type=_INT),
    ),
    # Our own fused attention (exporter/attention_function.py): a local function in the graphs.
    OpSchema(
        "LlmexportAttention", "llmexport", 1,
        inputs=[_P(n, "M" if n in ("position_ids", "seq_lens") else "T")
                for n in ("q", "k", "v", "k_cache", "v_cache", "position_ids", "seq_lens", "cos", "sin")],
        outputs=[_P("out", "T"), _P("k_cache_out", "T"), _P("v_cache_out", "T")],
        type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int64)"], "")],
        attributes=_attrs(num_heads=_INT, num_kv_heads=_INT, head_dim=_INT, scale=_FLOAT, window=_INT),
    ),
    OpSchema(
        "SkipSimplifiedLayerNormalization", MS_DOMAIN, 1,
        inputs=[_P("input", "T"), _P("skip", "T"), _P("gamma", "T"), _P("bias", "T", param_option=_OPT)],
        outputs=[_P("output", "T"), _P("mean", "U", param_option=_OPT), _P("inv_std_var", "U", param_option=_OPT),
                 _P("input_skip_bias_sum", "T", param_option=_OPT)],
        type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], "")],
        attributes=_attrs(epsilon=_FLOAT),
    ),
    # Weight-only quantized MatMul: B block-quantized along K (runtime/bundle/quant.py has the layout).
    OpSchema(
        "MatMulNBits", MS_DOMAIN, 1,
        inputs=[_P("A", "T1"), _P("B", "T2"), _P("scales", "T1"), _P("zero_points", "T3", param_option=_OPT),
                _P("g_idx", "T4", param_option=_OPT), _P("bias", "T1", param_option=_OPT)],
        outputs=[_P("Y", "T1")],
        type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)", *_FLOATS], ""), ("T4", ["tensor(int32)"], "")],
        attributes=_attrs(K=_INT, N=_INT, bits=_INT, block_size=_INT, accuracy_level=_INT),
    ),
    # Rows of a block-quantized table (the embedding), dequantized: same layout as MatMulNBits' B.
    OpSchema(
        "GatherBlockQuantized", MS_DOMAIN, 1,
        inputs=[_P("data", "T1"), _P("indices", "Tind"), _P("scales", "T2"),
                _P("zero_points", "T1", param_option=_OPT)],
        outputs=[_P("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], ""),
                          ("Tind", ["tensor(int32)", "tensor(int64)"], ""), ("T2", _FLOATS, "")],
        attributes=_attrs(gather_axis=_INT, quantize_axis=_INT, block_size=_INT, bits=_INT),
    ),
]


def register_contrib_schemas() -> None:
    for schema in _SCHEMAS:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)
