"""weights.bin: one file of raw little-endian tensors at aligned offsets, and its index.

The manifest's `weights.tensors` maps each graph initializer name to `{offset, length, shape,
dtype}` (bytes, bytes, elements, element type: the bundle's dtype, or uint8 for quantized
codes). Writing appends tensors at ALIGNMENT-byte offsets (so any OS can map them); reading
maps the file once and hands out read-only views. Names of tensors stored transposed end in
names.TRANSPOSED.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

ALIGNMENT = 64 * 1024
# Element types by bundle dtype; numpy has no bfloat16, so those are raw uint16 bits.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
# Element types a stored tensor may have: the bundle dtype's, or uint8 (packed quantized codes).
ELEMENT_DTYPES = NUMPY_DTYPES | {"uint8": np.uint8}
DTYPE_BYTES = {name: np.dtype(t).itemsize for name, t in ELEMENT_DTYPES.items()}


@dataclass(frozen=True)
class WeightEntry:
    name: str
    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"offset": self.offset, "length": self.length, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, name: str, t: dict, dtype: str, where: str) -> "WeightEntry":
        """An entry of the manifest's index, its types checked (dtype: the bundle's; uint8 allowed)."""
        try:
            offset, length, shape = t["offset"], t["length"], t["shape"]
            ok = (isinstance(shape, list) and all(type(v) is int for v in (offset, length, *shape)) and offset >= 0
                  and length >= 0 and all(d >= 0 for d in shape) and t["dtype"] in (dtype, "uint8"))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise LLMExportError(f"{where}: weight {name!r} has a malformed entry {t!r}; re-export the bundle")
        return cls(name, offset, length, tuple(shape), t["dtype"])


@dataclass(frozen=True)
class WeightIndex:
    """The manifest's `weights` record: the file, its size and every tensor's entry."""
    file: str
    bytes: int
    tensors: dict[str, WeightEntry]

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "tensors": {n: e.to_dict() for n, e in self.tensors.items()}}

    @classmethod
    def from_dict(cls, d: dict, dtype: str, where: str) -> "WeightIndex":
        tensors = {name: WeightEntry.from_dict(name, t, dtype, where) for name, t in d["tensors"].items()}
        return cls(d["file"], d["bytes"], tensors)


class WeightWriter:
    """Appends tensors (any object exposing the buffer protocol) at aligned offsets."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, WeightEntry] = {}
        try:
            self._file = open(path, "wb")
        except OSError as e:
            self._fail(e)

    def add(self, name: str, data, shape: tuple[int, ...], dtype: str) -> WeightEntry:
        if name in self.entries:
            raise LLMExportError(f"internal: tensor {name} written twice to {self.path.name}")
        view = memoryview(data).cast("B")
        try:
            offset = -self._file.tell() % ALIGNMENT + self._file.tell()
            self._file.seek(offset)
            self._file.write(view)
        except OSError as e:
            self._fail(e)
        entry = self.entries[name] = WeightEntry(name, offset, view.nbytes, tuple(int(d) for d in shape), dtype)
        return entry

    def alias(self, name: str, of: str, shape: tuple[int, ...]) -> WeightEntry:
        """`name` reads the same bytes as tensor `of`, in another shape (a packed table that
        both MatMulNBits and GatherBlockQuantized read)."""
        e = self.entries[of]
        entry = self.entries[name] = WeightEntry(name, e.offset, e.length, tuple(int(d) for d in shape), e.dtype)
        return entry

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:
            self._fail(e)

    def __enter__(self) -> "WeightWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, e: OSError):
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise LLMExportError(f"cannot write {self.path}: {reason}; free space or choose another --out") from None


def check_index(tensors: dict[str, WeightEntry], file_bytes: int, where: str) -> None:
    """Every entry in range, sized by its shape and element type, no two overlapping (two
    entries may name exactly the same bytes: an alias): numbers from the manifest are checked
    before any byte is mapped."""
    spans = []
    for name, t in tensors.items():
        offset, length, shape = t.offset, t.length, list(t.shape)
        if offset % ALIGNMENT:
            raise LLMExportError(f"{where}: weight {name!r} starts at byte {offset}, not a multiple of {ALIGNMENT}; "
                                 f"re-export the bundle")
        if int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[t.dtype] != length:
            raise LLMExportError(f"{where}: weight {name!r} has shape {shape} ({t.dtype}) but length {length}; "
                                 f"re-export the bundle")
        if offset + length > file_bytes:
            raise LLMExportError(f"{where}: weight {name!r} ends at byte {offset + length}, past the end of the "
                                 f"{file_bytes}-byte weight file; re-export the bundle")
        spans.append((offset, offset + length, name))
    spans.sort()
    for (start_a, end, a), (start, end_b, b) in zip(spans, spans[1:]):
        if start < end and (start_a, end) != (start, end_b):  # the same bytes exactly: an alias
            raise LLMExportError(f"{where}: weights {a!r} and {b!r} overlap; re-export the bundle")


def map_weights(path: Path, tensors: dict[str, WeightEntry]) -> dict[str, np.ndarray]:
    """Read-only views of every tensor, by name, into one memory map of `path`."""
    blob = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    return {name: np.frombuffer(blob, dtype=ELEMENT_DTYPES[t.dtype], offset=t.offset,
                                count=int(np.prod(t.shape, dtype=np.int64))).reshape(t.shape)
            for name, t in tensors.items()}
