"""The bundle's one weight file, written by streaming, and the graphs' references into it.

Tensors come one at a time from the model source (checkpoint or seeded init), so host memory
stays at a few tensors whatever the model size. Both graphs point their initializers at the
same byte ranges of `weights.bin`: no weight is stored twice and a runtime can map it once.

Linear weights that the trace consumes only through `Transpose(perm=[1, 0])` are stored
already transposed (`[in, out]`, named `<checkpoint name>.T`) and the Transpose nodes are
removed, so no runtime ever materialises a transposed copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx_ir as ir
import torch

from llmexport import LLMExportError
from llmexport.model.rope import rope_tables
from llmexport.model.weights import TORCH_DTYPES, ModelSource
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.quant import QuantizedWeight, pack
from llmexport.runtime.bundle.weights import NUMPY_DTYPES, WeightEntry, WeightWriter

IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16,
              "uint8": ir.DataType.UINT8}


def placeholder(graph: ir.Graph, name: str, shape: tuple[int, ...], dtype: ir.DataType) -> ir.Value:
    """A new initializer of `graph` whose data attach_weights points at once weights.bin is written."""
    tensor = ir.ExternalTensor(io.WEIGHTS_FILE, 0, 0, dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def fold_weight_transposes(model: ir.Model) -> None:
    """Replace `Transpose(W)` of an initializer by an initializer `W.T` that is stored transposed."""
    graph = model.graph
    for value in list(graph.initializers.values()):
        users = [node for node, _ in value.uses()]
        if not users or any(n.op_type != "Transpose" or list(n.attributes.get_ints("perm", [])) != [1, 0]
                            for n in users):
            continue
        rows, cols = value.shape
        stored = placeholder(graph, io.transposed(value.name), (cols, rows), value.dtype)
        for node in users:
            node.outputs[0].replace_all_uses_with(stored)
            graph.remove(node, safe=True)
        graph.initializers.pop(value.name)


def write_weights(source: ModelSource, dtype: str, max_seq_len: int, wanted: Iterable[str], path: Path,
                  on_tensor: Callable[[str], None] = lambda name: None,
                  quantized: dict[str, QuantizedWeight] | None = None) -> dict[str, WeightEntry]:
    """Stream every tensor in `wanted` (graph initializer names) into `path`; the checkpoint
    weights in `quantized` (quantize.quantize_graph's records) are packed on the way, each with
    the scheme its record names."""
    wanted, quantized = set(wanted), quantized or {}
    by_source = {io.checkpoint_name(n)[0]: n for n in wanted}
    with WeightWriter(path) as writer:
        for name, tensor in _tensors(source, "float32" if quantized else dtype, max_seq_len):
            if name in quantized:
                weight = quantized[name]
                packed = pack(tensor.numpy(), weight.scheme, NUMPY_DTYPES[dtype])
                for role, data in zip(("codes", "scales", weight.scheme.shift), packed):
                    if data is not None:
                        stored = getattr(weight, role)
                        writer.add(stored, data, data.shape, "uint8" if str(data.dtype) == "uint8" else dtype)
                        on_tensor(stored)
                if weight.rows:  # the same bytes, as the [rows, packed columns] table a gather reads
                    codes = writer.entries[weight.codes].shape
                    writer.alias(weight.rows, weight.codes, (codes[0], codes[1] * codes[2]))
                    on_tensor(weight.rows)
                continue
            if name not in by_source:
                continue
            graph_name = by_source[name]
            tensor = tensor.to(TORCH_DTYPES[dtype])
            if io.checkpoint_name(graph_name)[1]:
                tensor = tensor.t()
            writer.add(graph_name, tensor.contiguous().view(torch.uint8).numpy(), tuple(tensor.shape), dtype)
            on_tensor(graph_name)
    missing = wanted - set(writer.entries)
    if missing:
        raise LLMExportError(f"internal: no data for graph initializers {sorted(missing)}")
    return writer.entries


def _tensors(source: ModelSource, dtype: str, max_seq_len: int):
    """Tensors in `dtype`, one at a time (a quantized export asks for float32: it packs from
    float32, not from the bundle dtype; a float export converts once, straight to its dtype)."""
    yield from source.tensors(dtype)
    cos, sin = rope_tables(source.config, max_seq_len)
    yield io.ROPE_COS, cos
    yield io.ROPE_SIN, sin


def attach_weights(model: ir.Model, entries: dict[str, WeightEntry], dtype: str, bundle_dir: Path) -> None:
    """Point every initializer of `model` at its byte range in the weight file."""
    for name, value in model.graph.initializers.items():
        e = entries[name]
        dtype, shape = IR_DTYPES[e.dtype], e.shape
        if value.dtype in (ir.DataType.INT4, ir.DataType.INT8):  # packed codes seen as DequantizeLinear's input
            dtype, shape = value.dtype, tuple(value.shape)
            if math.prod(shape) * dtype.bitwidth != 8 * e.length:
                raise LLMExportError(f"internal: {name} as {dtype.name}{list(shape)} does not span its "
                                     f"{e.length} bytes")
        value.const_value = ir.ExternalTensor(io.WEIGHTS_FILE, e.offset, e.length, dtype,
                                              shape=ir.Shape(shape), name=name, base_dir=bundle_dir)
