"""weights.bin: one file of raw little-endian tensors at aligned offsets, and its index.

The manifest's `weights.tensors` maps each graph initializer name to `{offset, length, shape}`
(bytes, bytes, elements); the element type is the bundle's `dtype`. Writing appends tensors
at ALIGNMENT-byte offsets (so any OS can map them); reading maps the file once and hands out
read-only views. Names of tensors stored transposed end in names.TRANSPOSED.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

ALIGNMENT = 64 * 1024
# Element types by bundle dtype; numpy has no bfloat16, so those are raw uint16 bits.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
DTYPE_BYTES = {name: np.dtype(t).itemsize for name, t in NUMPY_DTYPES.items()}


@dataclass(frozen=True)
class WeightEntry:
    name: str
    offset: int
    length: int
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


class WeightWriter:
    """Appends tensors (any object exposing the buffer protocol) at aligned offsets."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, WeightEntry] = {}
        try:
            self._file = open(path, "wb")
        except OSError as e:
            self._fail(e)

    def add(self, name: str, data, shape: tuple[int, ...]) -> WeightEntry:
        if name in self.entries:
            raise LLMExportError(f"internal: tensor {name} written twice to {self.path.name}")
        view = memoryview(data).cast("B")
        try:
            offset = -self._file.tell() % ALIGNMENT + self._file.tell()
            self._file.seek(offset)
            self._file.write(view)
        except OSError as e:
            self._fail(e)
        entry = self.entries[name] = WeightEntry(name, offset, view.nbytes, tuple(int(d) for d in shape))
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


def check_index(tensors: dict, dtype: str, file_bytes: int, where: str) -> None:
    """Every entry in range, sized by its shape, no two overlapping: numbers from the manifest
    are checked before any byte is mapped."""
    itemsize = DTYPE_BYTES[dtype]
    spans = []
    for name, t in tensors.items():
        try:
            offset, length, shape = t["offset"], t["length"], t["shape"]
            ok = (all(type(v) is int for v in (offset, length, *shape)) and offset >= 0 and length >= 0
                  and all(d >= 0 for d in shape))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise LLMExportError(f"{where}: weight {name!r} has a malformed entry {t!r}; re-export the bundle")
        if offset % ALIGNMENT:
            raise LLMExportError(f"{where}: weight {name!r} starts at byte {offset}, not a multiple of {ALIGNMENT}; "
                                 f"re-export the bundle")
        if int(np.prod(shape, dtype=np.int64)) * itemsize != length:
            raise LLMExportError(f"{where}: weight {name!r} has shape {shape} ({dtype}) but length {length}; "
                                 f"re-export the bundle")
        if offset + length > file_bytes:
            raise LLMExportError(f"{where}: weight {name!r} ends at byte {offset + length}, past the end of the "
                                 f"{file_bytes}-byte weight file; re-export the bundle")
        spans.append((offset, offset + length, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise LLMExportError(f"{where}: weights {a!r} and {b!r} overlap; re-export the bundle")


def map_weights(path: Path, dtype: str, tensors: dict) -> dict[str, np.ndarray]:
    """Read-only views of every tensor, by name, into one memory map of `path`."""
    blob = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    element = np.dtype(NUMPY_DTYPES[dtype])
    return {name: np.frombuffer(blob, dtype=element, count=int(np.prod(t["shape"], dtype=np.int64)),
                                offset=t["offset"]).reshape(t["shape"])
            for name, t in tensors.items()}
