"""The fused attention op as an ONNX local function: `llmexport::LlmexportAttention`.

Its body is model/attention.py's reference math in standard ONNX ops, generic over shapes
(heads and head_dim are read from the inputs; `scale` and `window` are attribute references),
so one function serves every layer and model. Targets use it two ways:
  portable  the node is inlined: plain ai.onnx ops, runnable anywhere
  tensorrt  the node and function are kept: ONNX Runtime runs the body, while TensorRT
            (>= 10.7) replaces a local function by a registered plugin of the same name, whose
            fields are the node's attributes (num_heads, num_kv_heads, head_dim, scale, window)

Shapes: B batch, S new tokens, T cache capacity, Hq / Hkv heads, D head_dim, G = Hq / Hkv.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

DOMAIN = "llmexport"
NAME = "LlmexportAttention"
INPUTS = ["q", "k", "v", "k_cache", "v_cache", "position_ids", "seq_lens", "cos", "sin"]
OUTPUTS = ["out", "k_cache_out", "v_cache_out"]
ATTRIBUTES = ["num_heads", "num_kv_heads", "head_dim", "scale", "window"]  # the plugin's fields


class _Body:
    """Collects nodes; each call returns the output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}_{op}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def ints(self, *values: int) -> str:
        return self("Constant", value_ints=list(values))

    def ref(self, attribute: str, kind: int, as_name: str) -> str:
        """A Constant whose `as_name` value is the function attribute `attribute`."""
        node = helper.make_node("Constant", [], [f"t{len(self.nodes)}_{attribute}"])
        value = helper.make_attribute_ref(as_name, kind)
        value.ref_attr_name = attribute
        node.attribute.append(value)
        self.nodes.append(node)
        return node.output[0]


def function_proto(opset: int) -> onnx.FunctionProto:
    b = _Body()
    d = b("Shape", "k_cache", start=3, end=4)  # [D]
    hkv = b("Shape", "k_cache", start=1, end=2)
    t = b("Shape", "k_cache", start=2, end=3)
    batch, seq = b("Shape", "q", start=0, end=1), b("Shape", "q", start=1, end=2)
    minus_one = b.ints(-1)
    per_head = b("Concat", batch, seq, minus_one, d, axis=0)  # (B, S, -1, D)
    q = b("Transpose", b("Reshape", "q", per_head), perm=[0, 2, 1, 3])  # (B, Hq, S, D)
    k = b("Transpose", b("Reshape", "k", per_head), perm=[0, 2, 1, 3])  # (B, Hkv, S, D)
    v = b("Transpose", b("Reshape", "v", per_head), perm=[0, 2, 1, 3])

    cos = b("Unsqueeze", b("Gather", "cos", "position_ids"), b.ints(1))  # (B, 1, S, D/2)
    sin = b("Unsqueeze", b("Gather", "sin", "position_ids"), b.ints(1))
    cos, sin = b("Concat", cos, cos, axis=-1), b("Concat", sin, sin, axis=-1)  # (B, 1, S, D)
    half, zero, axis3 = b("Div", d, b.ints(2)), b.ints(0), b.ints(3)

    def rotate(x: str) -> str:
        x1 = b("Slice", x, zero, half, axis3)
        x2 = b("Slice", x, half, d, axis3)
        return b("Add", b("Mul", x, cos), b("Mul", b("Concat", b("Neg", x2), x1, axis=3), sin))

    q, k = rotate(q), rotate(k)
    slots = b("Expand", b("Unsqueeze", "position_ids", b.ints(1, 3)), b("Shape", k))  # (B, Hkv, S, D)
    k_cache = b("ScatterElements", "k_cache", slots, k, axis=2, out="k_cache_out")  # (B, Hkv, T, D)
    v_cache = b("ScatterElements", "v_cache", slots, v, axis=2, out="v_cache_out")

    grouped = b("Reshape", q, b("Concat", batch, hkv, minus_one, seq, d, axis=0))  # (B, Hkv, G, S, D)
    keys = b("Transpose", b("Unsqueeze", k_cache, b.ints(2)), perm=[0, 1, 2, 4, 3])  # (B, Hkv, 1, D, T)
    scale = b("CastLike", b.ref("scale", onnx.AttributeProto.FLOAT, "value_float"), "q")
    scores = b("Cast", b("Mul", b("MatMul", grouped, keys), scale), to=TensorProto.FLOAT)  # (B, Hkv, G, S, T)

    j = b("Range", b("Constant", value=helper.make_tensor("", TensorProto.INT64, [], [0])), b("Squeeze", t),
          b("Constant", value=helper.make_tensor("", TensorProto.INT64, [], [1])))  # (T,)
    p = b("Unsqueeze", "position_ids", b.ints(2))  # (B, S, 1)
    window = b.ref("window", onnx.AttributeProto.INT, "value_int")
    no_window = b("LessOrEqual", window, b("Constant", value=helper.make_tensor("", TensorProto.INT64, [], [0])))
    visible = b("And", b("LessOrEqual", j, p), b("Or", no_window, b("Less", b("Sub", p, j), window)))  # (B, S, T)
    minus_inf = b("Constant", value=helper.make_tensor("", TensorProto.FLOAT, [], [float("-inf")]))
    scores = b("Where", b("Unsqueeze", visible, b.ints(1, 2)), scores, minus_inf)
    probs = b("CastLike", b("Softmax", scores, axis=-1), "q")
    out = b("MatMul", probs, b("Unsqueeze", v_cache, b.ints(2)))  # (B, Hkv, G, S, D)
    out = b("Transpose", b("Reshape", out, b("Concat", batch, minus_one, seq, d, axis=0)), perm=[0, 2, 1, 3])
    b("Reshape", out, b("Concat", batch, seq, minus_one, axis=0), out="out")  # (B, S, Hq*D)
    return helper.make_function(DOMAIN, NAME, INPUTS, OUTPUTS, b.nodes, [helper.make_opsetid("", opset)],
                                attributes=ATTRIBUTES)


def add_to(model: ir.Model) -> None:
    """Give a traced graph that calls the op its local function."""
    function = ir.serde.deserialize_function(function_proto(model.opset_imports[""]))
    model.functions[function.identifier()] = function
