"""`--quant int8|int4`: which weights are quantized, and the graph rewrite that reads them packed.

Every linear layer's weight (q/k/v/o, gate/up/down of every layer) and, unless skipped, the LM
head, is stored block-quantized (runtime/bundle/quant.py owns the layout) and consumed by ONNX
Runtime's `com.microsoft::MatMulNBits` instead of a float MatMul; an asymmetric weight's
per-block offsets add one small MatMul (see _offset_correction). The vocabulary tables
(embedding, LM head) use `--quant-head` bits, int8 unless asked: the output layer is the most
sensitive to rounding (llama.cpp likewise keeps it at 6-8 bits in its 4-bit files).
The packing itself happens while the weights stream into weights.bin (weights_file.py), one
tensor at a time.

The embedding table, unless `--quant-skip embed`, is read by `com.microsoft::GatherBlockQuantized`
from the same packed bytes. A tied table (Qwen2, SmolLM2) is stored once and read packed by
both the gather and the LM head's MatMulNBits (a second weight-index entry, `rows`, names the
same bytes as a [vocab, hidden * bits / 8] matrix); skipping either keeps the table float.

The `portable` and `tensorrt` targets read signed int4/int8 [K, N] codes through standard
blocked DequantizeLinear (opset 21, axis 0, no zero point) straight into MatMul, the pattern
TensorRT's weight-only quantization consumes; their embedding (and so a tied table) stays float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from llmexport import LLMExportError
from llmexport.model.config import ModelConfig
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.quant import BITS, DEQUANTIZE, MATMULNBITS, QuantizedWeight, Scheme, check_block, shapes

from .contrib_schemas import MS_DOMAIN
from .weights_file import placeholder

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (= 1), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
SKIPPABLE = ("lm_head", "embed")
ZERO_POINTS = ("float", "uint8")


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "int8" or "int4": the linear layers
    block_size: int = 32
    symmetric: bool | None = None  # None: by bits, int8 symmetric and int4 asymmetric (README: measured)
    accuracy_level: int = 4
    skip: frozenset[str] = field(default_factory=frozenset)
    head: str = "int8"  # the vocabulary tables (embedding, LM head)
    # error-minimising scale/clip search per block (runtime/bundle/quant.py); None: on for asymmetric
    # int4 blocks, off otherwise (measured on Qwen2.5-Coder-0.5B, docs/quantization.md: it helps the
    # float-offset grid and hurts the symmetric one)
    search: bool | None = None
    zero_point: str = "float"  # asymmetric blocks: a float offset, or a uint8 zero point ("uint8")

    def scheme(self, role: str = "linear", target: str = "ort") -> Scheme:
        """The scheme of the linear layers, or of the vocabulary tables (role "head")."""
        bits = BITS[self.head if role == "head" else self.method]
        symmetric = bits == 8 if self.symmetric is None else self.symmetric
        search = (bits == 4 and not symmetric) if self.search is None else self.search
        return Scheme(bits, self.block_size, symmetric, layout(target), search, self.zero_point == "uint8")


def layout(target: str) -> str:
    """How a target's graphs read packed weights: ONNX Runtime's contrib ops, or standard
    blocked DequantizeLinear (opset 21) feeding MatMul, the pattern TensorRT's weight-only
    quantization consumes."""
    return MATMULNBITS if target == "ort" else DEQUANTIZE


def check_quant(quant: QuantConfig, target: str, dtype: str) -> None:
    for flag, method in (("--quant", quant.method), ("--quant-head", quant.head)):
        if method not in BITS:
            raise LLMExportError(f"unknown {flag} {method!r}; choose int8 or int4")
    if dtype not in ("float32", "float16"):
        raise LLMExportError(f"--quant needs --dtype float32 or float16 (the scales' type), not {dtype}")
    if quant.zero_point not in ZERO_POINTS:
        raise LLMExportError(f"--quant-zero-point {quant.zero_point!r}: choose one of {', '.join(ZERO_POINTS)}")
    if quant.accuracy_level not in ACCURACY_LEVELS:
        raise LLMExportError(f"--accuracy-level {quant.accuracy_level} must be one of {ACCURACY_LEVELS}")
    unknown = set(quant.skip) - set(SKIPPABLE)
    if unknown:
        raise LLMExportError(f"--quant-skip {','.join(sorted(unknown))}: only {', '.join(SKIPPABLE)} can be skipped")


def stored_names(checkpoint: str, scheme: Scheme, rows: bool = False) -> dict[str, str]:
    """weights.bin names of a quantized checkpoint weight, by role (`rows`: with the rows view
    a gather reads)."""
    roles = ["codes", "scales", *([scheme.shift] if scheme.shift else []), *(["rows"] if rows else [])]
    return {role: io.quantized(checkpoint, role, scheme.bits) for role in roles}


def quantize_graph(model: ir.Model, config: ModelConfig, quant: QuantConfig, dtype: ir.DataType,
                   target: str = "ort") -> dict[str, QuantizedWeight]:
    """Replace each float MatMul of a linear weight by MatMulNBits (`ort`) or by MatMul of a
    blocked DequantizeLinear (other targets), and on `ort` the embedding's Gather by
    GatherBlockQuantized, over their packed tensors. Returns the manifest's per-weight records
    by checkpoint name.
    Other targets keep the embedding float (no standard op gathers packed int4 rows), and so a
    tied table (read by both) too."""
    graph, dequantize = model.graph, layout(target) == DEQUANTIZE
    skip = quant.skip | ({"embed"} if dequantize else set())
    record, block_sums = {}, {}
    for value in list(graph.initializers.values()):
        checkpoint, transposed = io.checkpoint_name(value.name)
        users = list(value.uses())
        gathers, role = [], "linear"
        if transposed:  # [K, N], read by MatMul(x, W.T) (weights_file.fold_weight_transposes)
            if not users or any(n.op_type != "MatMul" or i != 1 for n, i in users):
                continue
            k, n = value.shape
        elif checkpoint == "lm_head.weight" and "lm_head" not in skip:
            if not users or any(not _is_plain_gemm_bt(node, i) for node, i in users):
                continue
            (n, k), role = value.shape, "head"
        elif checkpoint == "model.embed_tokens.weight" and "embed" not in skip and not (
                config.tie_word_embeddings and "lm_head" in skip):
            gathers = [node for node, i in users if node.op_type == "Gather" and i == 0
                       and node.attributes.get_int("axis", 0) == 0]
            if not users or any(node not in gathers and not _is_plain_gemm_bt(node, i) for node, i in users):
                continue
            (n, k), role = value.shape, "head"
        else:
            continue
        scheme = quant.scheme(role, target)
        check_block(scheme.block_size, k, checkpoint)
        names = stored_names(checkpoint, scheme, rows=bool(gathers))
        roles = shapes(n, k, scheme)
        if gathers:
            roles["rows"] = (n, k * scheme.bits // 8)
        if len(gathers) == len(users):  # only gathered: the graphs read the rows view alone
            roles.pop("codes")
        if dequantize:  # the stored bytes, seen as DequantizeLinear's signed [K, N] tensor
            roles["codes"] = (k, n)
        code_type = (ir.DataType.INT4 if scheme.bits == 4 else ir.DataType.INT8) if dequantize else ir.DataType.UINT8
        packed = {role: placeholder(graph, names[role], shape, code_type if role == "codes" else ir.DataType.UINT8
                                    if role in ("rows", "zero_points") else dtype) for role, shape in roles.items()}
        zero_points = [packed["zero_points"]] if "zero_points" in packed else []
        for node, _ in users:
            if node in gathers:
                replacement = [ir.node("GatherBlockQuantized", [packed["rows"], node.inputs[1], packed["scales"],
                                                                *zero_points],
                                       domain=MS_DOMAIN, attributes={"gather_axis": 0, "quantize_axis": 1,
                                                                     "block_size": scheme.block_size,
                                                                     "bits": scheme.bits})]
                if "offsets" in packed:
                    replacement += _gathered_offsets(packed["offsets"], node.inputs[1], replacement[0].outputs[0],
                                                     scheme.block_size, k)
            elif dequantize:  # [K, N] blocked along K, straight into MatMul (the LM head's Gemm too)
                weight = ir.node("DequantizeLinear", [packed["codes"], packed["scales"]],
                                 attributes={"axis": 0, "block_size": scheme.block_size})
                replacement = [weight, ir.node("MatMul", [node.inputs[0], weight.outputs[0]])]
                if "offsets" in packed:
                    replacement += _offset_correction(node, replacement[-1].outputs[0], packed["offsets"],
                                                      scheme.block_size, k, block_sums)
            else:
                replacement = [ir.node("MatMulNBits", [node.inputs[0], packed["codes"], packed["scales"], *zero_points],
                                       domain=MS_DOMAIN, attributes={
                                           "K": k, "N": n, "bits": scheme.bits, "block_size": scheme.block_size,
                                           "accuracy_level": quant.accuracy_level})]
                if "offsets" in packed:
                    replacement += _offset_correction(node, replacement[0].outputs[0], packed["offsets"],
                                                      scheme.block_size, k, block_sums)
            _replace(graph, node, replacement)
        graph.initializers.pop(value.name)
        record[checkpoint] = QuantizedWeight(scheme, (n, k), **names)
    if not dequantize:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return record


def _int64s(values: list[int]) -> ir.Value:
    return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))}).outputs[0]


def _offset_correction(node: ir.Node, product: ir.Value, offsets: ir.Value, block: int, k: int,
                       block_sums: dict) -> list[ir.Node]:
    """x @ W.T for W = W0 + offset (broadcast over each block) is x @ W0.T (MatMulNBits) plus
    block_sum(x) @ offsets, where block_sum(x) sums x over each block of K: a [.., K/block]
    by [K/block, N] product (offsets are stored that way round), 1/block the size of the
    weight (llama.cpp's q4_1 dot product). The block sums of one input are computed once for
    all the linears that read it."""
    x = node.inputs[0]
    if x.shape is None:
        raise LLMExportError(f"internal: the input of {node.name} has no known rank")
    nodes = []
    if (x, block) not in block_sums:
        split = ir.node("Reshape", [x, _int64s([0] * (len(x.shape) - 1) + [k // block, block])])
        total = ir.node("ReduceSum", [split.outputs[0], _int64s([-1])], attributes={"keepdims": 0})
        nodes += [split.inputs[1].producer(), split, total.inputs[1].producer(), total]
        block_sums[(x, block)] = total.outputs[0]
    correction = ir.node("MatMul", [block_sums[(x, block)], offsets])
    return nodes + [correction, ir.node("Add", [product, correction.outputs[0]])]


def _gathered_offsets(offsets: ir.Value, ids: ir.Value, rows: ir.Value, block: int, k: int) -> list[ir.Node]:
    """GatherBlockQuantized's rows plus each block's offset, repeated over the block."""
    rank = len(ids.shape)
    picked = ir.node("Gather", [offsets, ids], attributes={"axis": 1})  # [K/block, ..]
    turned = ir.node("Transpose", [picked.outputs[0]], attributes={"perm": [*range(1, rank + 1), 0]})
    column = ir.node("Unsqueeze", [turned.outputs[0], _int64s([-1])])
    spread = ir.node("Expand", [column.outputs[0], _int64s([1, block])])  # [.., K/block, block]
    flat = ir.node("Reshape", [spread.outputs[0], _int64s([0] * rank + [k])])
    return [column.inputs[1].producer(), spread.inputs[1].producer(), flat.inputs[1].producer(),
            picked, turned, column, spread, flat, ir.node("Add", [rows, flat.outputs[0]])]


def _replace(graph: ir.Graph, node: ir.Node, replacement: list[ir.Node]) -> None:
    """Insert `replacement` (in order) before `node`; its last node's output takes over node's."""
    graph.insert_before(node, replacement)
    old, new = node.outputs[0], replacement[-1].outputs[0]
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name, new.type, new.shape = old.name, old.type, old.shape
    graph.remove(node, safe=True)


def _is_plain_gemm_bt(node: ir.Node, index: int) -> bool:
    """Gemm(x, W, transB=1) with no C and unit alpha: x @ W.T, what MatMulNBits computes."""
    attrs = node.attributes
    return (node.op_type == "Gemm" and index == 1 and len(node.inputs) == 2
            and attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
            and attrs.get_float("alpha", 1.0) == 1.0)

