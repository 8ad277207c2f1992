"""The bundle's one weight file, written by streaming, and the graphs' references into it.

Tensors come one at a time from the model source (checkpoint or seeded init), so host memory
stays at a few tensors whatever the model size. Both graphs point their initializers at the
same byte ranges of `weights.bin`: no weight is stored twice and a runtime can map it once.

Linear weights that the trace consumes only through `Transpose(perm=[1, 0])` are stored
already transposed (`[in, out]`, named `<checkpoint name>.T`) and the Transpose nodes are
removed, so no runtime ever materialises a transposed copy.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_ir as ir
import torch

from llmexport import LLMExportError
from llmexport.model.rope import rope_tables
from llmexport.model.weights import TORCH_DTYPES, ModelSource

from . import io_names as io

ALIGNMENT = 64 * 1024  # offsets a runtime can mmap on any OS
_IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class WeightEntry:
    name: str
    offset: int
    length: int
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def fold_weight_transposes(model: ir.Model) -> None:
    """Replace `Transpose(W)` of an initializer by an initializer `W.T` that is stored transposed."""
    graph = model.graph
    for value in list(graph.initializers.values()):
        users = [node for node, _ in value.uses()]
        if not users or any(n.op_type != "Transpose" or list(n.attributes.get_ints("perm", [])) != [1, 0]
                            for n in users):
            continue
        rows, cols = value.shape
        name, shape = value.name + io.TRANSPOSED, ir.Shape([cols, rows])
        # Data is attached by attach_weights once the weight file is written.
        placeholder = ir.ExternalTensor(io.WEIGHTS_FILE, 0, 0, value.dtype, shape=shape, name=name)
        stored = ir.Value(name=name, shape=shape, type=value.type, const_value=placeholder)
        graph.register_initializer(stored)
        for node in users:
            node.outputs[0].replace_all_uses_with(stored)
            graph.remove(node, safe=True)
        graph.initializers.pop(value.name)


def _source_name(name: str) -> str:
    return name.removesuffix(io.TRANSPOSED)


def write_weights(source: ModelSource, dtype: str, max_seq_len: int, wanted: Iterable[str], path: Path,
                  on_tensor: Callable[[str], None] = lambda name: None) -> dict[str, WeightEntry]:
    """Stream every tensor in `wanted` (graph initializer names) into `path`."""
    wanted = set(wanted)
    by_source = {_source_name(n): n for n in wanted}
    entries: dict[str, WeightEntry] = {}
    try:
        with open(path, "wb") as f:
            for name, tensor in _tensors(source, dtype, max_seq_len):
                if name not in by_source:
                    continue
                graph_name = by_source[name]
                if graph_name.endswith(io.TRANSPOSED):
                    tensor = tensor.t()
                data = tensor.contiguous().view(torch.uint8).numpy()
                offset = -f.tell() % ALIGNMENT + f.tell()
                f.seek(offset)
                f.write(data.data)
                entries[graph_name] = WeightEntry(graph_name, offset, data.nbytes, tuple(tensor.shape))
                on_tensor(graph_name)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise LLMExportError(f"cannot write {path}: {reason}; free space or choose another --out") from None
    missing = wanted - set(entries)
    if missing:
        raise LLMExportError(f"internal: no data for graph initializers {sorted(missing)}")
    return entries


def _tensors(source: ModelSource, dtype: str, max_seq_len: int):
    yield from source.tensors(dtype)
    cos, sin = rope_tables(source.config, max_seq_len)
    yield io.ROPE_COS, cos.to(TORCH_DTYPES[dtype])
    yield io.ROPE_SIN, sin.to(TORCH_DTYPES[dtype])


def attach_weights(model: ir.Model, entries: dict[str, WeightEntry], dtype: str, bundle_dir: Path) -> None:
    """Point every initializer of `model` at its byte range in the weight file."""
    for name, value in model.graph.initializers.items():
        e = entries[name]
        value.const_value = ir.ExternalTensor(io.WEIGHTS_FILE, e.offset, e.length, _IR_DTYPES[dtype],
                                              shape=ir.Shape(e.shape), name=name, base_dir=bundle_dir)
