"""The C API (llmexport.h): its sources, here, and the builder of libllmexport.so.

The library has no Python in it. It is a small C layer (these .c files) over onnxruntime-genai's
C library, which the onnxruntime-genai wheel ships as libonnxruntime-genai.so and which loads
ONNX Runtime's libonnxruntime.so.1 from its own folder. `build_library(DIR)` compiles the layer
with the system C compiler and copies both libraries beside it, so DIR/lib is what a service
ships, with DIR/include/llmexport.h to compile against. Python is needed only to build (to find
the two wheels' files); nothing here imports onnxruntime_genai.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import llmexport
from llmexport import LLMExportError

HERE = Path(__file__).parent
HEADER = HERE / "llmexport.h"
SOURCES = ("errors.c", "structs.c", "registry.c", "bundle.c", "integrity.c", "sha256.c", "json.c", "sampling.c",
           "session.c", "generate.c")
GENAI_LIBRARY = "libonnxruntime-genai.so"
ORT_LIBRARY = "libonnxruntime.so.1"  # the SONAME onnxruntime-genai looks for in its own folder


def _package_dir(name: str, pip_name: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LLMExportError(f"building the C API needs the {pip_name} wheel's library: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def native_libraries() -> dict[str, Path]:
    """The onnxruntime-genai and ONNX Runtime shared libraries to ship, by the name each is shipped as."""
    genai = _package_dir("onnxruntime_genai", "onnxruntime-genai") / GENAI_LIBRARY
    ort = sorted((_package_dir("onnxruntime", "onnxruntime") / "capi").glob("libonnxruntime.so.1.*"))
    if not genai.is_file() or not ort:
        raise LLMExportError(f"{genai if not genai.is_file() else 'libonnxruntime.so.1.*'} is missing from its "
                             f"wheel; reinstall onnxruntime-genai and onnxruntime")
    return {GENAI_LIBRARY: genai, ORT_LIBRARY: ort[-1]}


def exports_map() -> str:
    """A linker version script exporting the header's functions only (the files' shared helpers stay inside)."""
    names = sorted(set(re.findall(r"\b(llmx_\w+)\s*\(", HEADER.read_text())))
    return "{ global: " + " ".join(f"{n};" for n in names) + " local: *; };\n"


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise LLMExportError("building the C API needs a C compiler: install gcc (apt-get install gcc) or set CC")
    return cc


def build_library(out_dir: str | Path) -> Path:
    """Compile DIR/lib/libllmexport.so, copy the libraries it needs beside it and the header to
    DIR/include; returns the library's path."""
    out = Path(out_dir).resolve()
    lib, include = out / "lib", out / "include"
    lib.mkdir(parents=True, exist_ok=True)
    include.mkdir(parents=True, exist_ok=True)
    for name, source in native_libraries().items():
        shutil.copyfile(source, lib / name)  # a copy, not a link: the folder is shipped as it is
    shutil.copyfile(HEADER, include / HEADER.name)
    target = lib / "libllmexport.so"
    with tempfile.TemporaryDirectory() as tmp:
        exports = Path(tmp) / "exports.map"
        exports.write_text(exports_map())
        command = [compiler(), "-shared", "-fPIC", "-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall",
                   "-Wextra", f'-DLLMX_VERSION="{llmexport.__version__}"', f"-I{HERE}",
                   *(str(HERE / s) for s in SOURCES), "-o", str(Path(tmp) / target.name),
                   f"-Wl,--version-script={exports}", "-Wl,-soname,libllmexport.so", f"-L{lib}",
                   "-lonnxruntime-genai", "-Wl,-rpath,$ORIGIN", "-pthread", "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise LLMExportError(f"compiling the C API failed:\n{done.stderr.strip()}")
        shutil.copyfile(Path(tmp) / target.name, target)
    return target


def shipped_files(out_dir: str | Path) -> list[tuple[Path, int]]:
    """(path, bytes) of every file a service ships from DIR/lib."""
    return [(p, p.stat().st_size) for p in sorted((Path(out_dir) / "lib").iterdir()) if p.is_file()]
