"""Every path a bundle names stays inside the bundle: manifest entries and ONNX external data.

A bundle is copied between machines and opened by services, so it is untrusted input: a
manifest or graph that points at `../x`, `/etc/passwd` or a symlink leading out is refused
before anything is read from there.
"""

from __future__ import annotations

from pathlib import Path

from llmexport import LLMExportError


def inside(bundle_dir: Path, name, where: str) -> Path:
    """`bundle_dir / name`, refused unless `name` is relative and resolves (after symlinks)
    inside the bundle."""
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute():
        raise LLMExportError(f"{where} names file {name!r}: only relative paths inside the bundle are allowed; "
                             f"re-export the bundle")
    root = bundle_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise LLMExportError(f"{where} names file {name!r}, which resolves outside the bundle ({path}); "
                             f"refusing to read it")
    return path


def _tensors(graph):
    """Every TensorProto of a GraphProto: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for sub in attr.graphs:
            yield from _tensors(sub)


def check_graph(bundle_dir: Path, graph_path: Path) -> None:
    """Parse `graph_path` (without its external data) and check that every external-data entry
    names a file inside the bundle and a byte range inside that file. A damaged protobuf is
    reported here, by name, instead of inside a runtime."""
    import onnx

    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-derived errors, ...
        raise LLMExportError(f"cannot parse {graph_path}: {type(e).__name__}; the file is damaged, re-copy or "
                             f"re-export the bundle") from None
    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors += list(_node_tensors(node))
    where = f"{graph_path.name} (external data)"
    sizes: dict[Path, int] = {}
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        path = inside(bundle_dir, entry.get("location"), where)
        if path not in sizes:
            if not path.is_file():
                raise LLMExportError(f"{where}: tensor {tensor.name!r} is stored in {entry.get('location')!r}, which "
                                     f"does not exist; re-export the bundle")
            sizes[path] = path.stat().st_size
        try:
            offset, length = int(entry.get("offset", 0)), int(entry.get("length", sizes[path]))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0 or offset + length > sizes[path]:
            raise LLMExportError(f"{where}: tensor {tensor.name!r} names bytes {offset}..{offset + length} of "
                                 f"{entry.get('location')}, outside its {sizes[path]} bytes; re-export the bundle")
