"""Bundles: a directory with manifest.json and the files it names, never half-written.

`staging(out, force)` yields a temporary directory beside `out`; it is renamed into place only
when everything inside was written, and removed on any error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from llmexport import LLMExportError
from llmexport.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST

_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
                ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LLMExportError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LLMExportError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    out = out.resolve()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def io_spec(values) -> list[dict]:
    """[{name, dtype, shape}] with symbolic dims as strings."""
    return [{"name": v.name, "dtype": _DTYPE_NAMES[v.dtype],
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape]} for v in values]


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    (bundle_dir / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest},
                                                  indent=2))
