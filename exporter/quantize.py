"""`--quant int8|int4`: which weights are quantized, and the graph rewrite that reads them packed.

Every linear layer's weight (q/k/v/o, gate/up/down of every layer) and, unless skipped, the LM
head, is stored block-quantized (runtime/bundle/quant.py owns the layout) and consumed by ONNX
Runtime's `com.microsoft::MatMulNBits` instead of a float MatMul.
The packing itself happens while the weights stream into weights.bin (weights_file.py), one
tensor at a time.

The embedding table, unless `--quant-skip embed`, is read by `com.microsoft::GatherBlockQuantized`
from the same packed bytes. A tied table (Qwen2, SmolLM2) is stored once and read packed by
both the gather and the LM head's MatMulNBits (a second weight-index entry, `rows`, names the
same bytes as a [vocab, hidden * bits / 8] matrix); skipping either keeps the table float.

Not yet (refused with a clear error): the `portable` and `tensorrt` targets (blocked
DequantizeLinear).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from llmexport import LLMExportError
from llmexport.model.config import ModelConfig
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.quant import BITS, Scheme, check_block, shapes

from .contrib_schemas import MS_DOMAIN
from .weights_file import placeholder

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (= 1), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
SKIPPABLE = ("lm_head", "embed")


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "int8" or "int4"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    skip: frozenset[str] = field(default_factory=frozenset)

    @property
    def scheme(self) -> Scheme:
        return Scheme(BITS[self.method], self.block_size, self.symmetric)


def check_quant(quant: QuantConfig, target: str, dtype: str) -> None:
    if quant.method not in BITS:
        raise LLMExportError(f"unknown --quant {quant.method!r}; choose none, int8 or int4")
    if target != "ort":
        raise LLMExportError(f"--quant is implemented for --target ort only (MatMulNBits); --target {target} "
                             f"(blocked DequantizeLinear) is not done yet: export it without --quant")
    if dtype not in ("float32", "float16"):
        raise LLMExportError(f"--quant needs --dtype float32 or float16 (the scales' type), not {dtype}")
    if quant.accuracy_level not in ACCURACY_LEVELS:
        raise LLMExportError(f"--accuracy-level {quant.accuracy_level} must be one of {ACCURACY_LEVELS}")
    unknown = set(quant.skip) - set(SKIPPABLE)
    if unknown:
        raise LLMExportError(f"--quant-skip {','.join(sorted(unknown))}: only {', '.join(SKIPPABLE)} can be skipped")


def stored_names(checkpoint: str, quant: QuantConfig) -> dict[str, str]:
    """weights.bin names of a quantized checkpoint weight, by role."""
    names = {"codes": f"{checkpoint}.q{quant.scheme.bits}", "scales": f"{checkpoint}.scales"}
    if not quant.symmetric:
        names["zero_points"] = f"{checkpoint}.zero_points"
    return names


def quantize_graph(model: ir.Model, config: ModelConfig, quant: QuantConfig, dtype: ir.DataType) -> dict[str, dict]:
    """Replace each float MatMul of a linear weight by MatMulNBits, and the embedding's Gather by
    GatherBlockQuantized, over their packed tensors. Returns the manifest's per-weight record:
    {checkpoint name: {codes, scales, zero_points, rows, shape}}."""
    graph = model.graph
    record = {}
    for value in list(graph.initializers.values()):
        checkpoint, transposed = io.checkpoint_name(value.name)
        users = list(value.uses())
        gathers = []
        if transposed:  # [K, N], read by MatMul(x, W.T) (weights_file.fold_weight_transposes)
            if not users or any(n.op_type != "MatMul" or i != 1 for n, i in users):
                continue
            k, n = value.shape
        elif checkpoint == "lm_head.weight" and "lm_head" not in quant.skip:
            if not users or any(not _is_plain_gemm_bt(node, i) for node, i in users):
                continue
            n, k = value.shape
        elif checkpoint == "model.embed_tokens.weight" and "embed" not in quant.skip and not (
                config.tie_word_embeddings and "lm_head" in quant.skip):
            gathers = [node for node, i in users if node.op_type == "Gather" and i == 0
                       and node.attributes.get_int("axis", 0) == 0]
            if not users or any(node not in gathers and not _is_plain_gemm_bt(node, i) for node, i in users):
                continue
            n, k = value.shape
        else:
            continue
        check_block(quant.block_size, k, checkpoint)
        names = stored_names(checkpoint, quant)
        roles = shapes(n, k, quant.scheme)
        if gathers:
            names["rows"] = names["codes"] + ".rows"
            roles["rows"] = (n, k * quant.scheme.bits // 8)
        if len(gathers) == len(users):  # only gathered: the graphs read the rows view alone
            roles.pop("codes")
        packed = {role: placeholder(graph, names[role], shape, dtype if role == "scales" else ir.DataType.UINT8)
                  for role, shape in roles.items()}
        zero = [packed["zero_points"]] if "zero_points" in packed else []
        for node, _ in users:
            if node in gathers:
                replacement = ir.node("GatherBlockQuantized", [packed["rows"], node.inputs[1], packed["scales"], *zero],
                                      domain=MS_DOMAIN, attributes={"gather_axis": 0, "quantize_axis": 1,
                                                                    "block_size": quant.block_size,
                                                                    "bits": quant.scheme.bits})
            else:
                replacement = ir.node("MatMulNBits", [node.inputs[0], packed["codes"], packed["scales"], *zero],
                                      domain=MS_DOMAIN, attributes={
                                          "K": k, "N": n, "bits": quant.scheme.bits, "block_size": quant.block_size,
                                          "accuracy_level": quant.accuracy_level})
            _replace(graph, node, replacement)
        graph.initializers.pop(value.name)
        record[checkpoint] = {"zero_points": None, "rows": None, **names, "shape": [n, k]}
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return record


def _replace(graph: ir.Graph, node: ir.Node, replacement: ir.Node) -> None:
    graph.insert_before(node, replacement)
    old, new = node.outputs[0], replacement.outputs[0]
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name, new.type, new.shape = old.name, old.type, old.shape
    graph.remove(node, safe=True)


def _is_plain_gemm_bt(node: ir.Node, index: int) -> bool:
    """Gemm(x, W, transB=1) with no C and unit alpha: x @ W.T, what MatMulNBits computes."""
    attrs = node.attributes
    return (node.op_type == "Gemm" and index == 1 and len(node.inputs) == 2
            and attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
            and attrs.get_float("alpha", 1.0) == 1.0)

