"""Dependencies point one way: model -> exporter -> bundle format <- runtime (README, "Layout").

Read from the source with `ast` (every import statement, at any depth, lazy ones included), so
a new import that breaks the direction fails here even if no test runs that code path.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"model": "llmexport.model", "exporter": "llmexport.exporter", "runtime": "llmexport.runtime",
            "benchmarks": "llmexport.benchmarks", "llmexport": "llmexport"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = node.module or ""
            if node.level:
                name = f"{base}.{name}" if name else base
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _violations(folder: str, forbidden: tuple[str, ...], allowed_files: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in _files(folder):
        if path.relative_to(ROOT).as_posix() in allowed_files:
            continue
        for name in sorted(imports_of(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_the_runtime_never_imports_the_exporter_benchmarks_or_cli():
    assert _violations("runtime", ("llmexport.exporter", "llmexport.benchmarks", "llmexport.cli")) == []


def test_only_the_torch_backend_reaches_the_torch_model():
    """The runtime is torch-free; its torch backend (the reference, for comparison) is the one
    place that loads the torch model, lazily."""
    assert _violations("runtime", ("torch", "llmexport.model", "transformers"),
                       allowed_files=("runtime/backends/torch.py",)) == []


def test_the_bundle_format_depends_on_nothing_but_itself():
    """runtime/bundle/ owns the format: only the standard library, numpy, onnx (to parse graphs
    for their external-data paths) and the project's error type."""
    allowed_third_party = {"numpy", "onnx"}
    bad = []
    for path in _files("runtime/bundle"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if name.startswith("llmexport"):
                own = name.startswith("llmexport.runtime.bundle")
                if not (own or name in ("llmexport", "llmexport.LLMExportError")):
                    bad.append(f"{path.name} imports {name}")
            elif top not in allowed_third_party and top not in _stdlib():
                bad.append(f"{path.name} imports {name}")
    assert bad == []


def test_the_model_imports_neither_exporter_nor_runtime_but_the_kv_layout():
    """The model reads the bundle format's KV layout (standard library only, see the next test)
    and nothing else of the runtime."""
    kv = ("llmexport.runtime.bundle.kv", "llmexport.runtime.bundle.kv.KVLayout")
    bad = _violations("model", ("llmexport.exporter", "llmexport.runtime", "llmexport.benchmarks"))
    assert [b for b in bad if b.split(" imports ")[1] not in kv] == []


def test_the_kv_layout_imports_only_the_standard_library_and_names():
    """What the model imports of the format stays tiny and torch-free."""
    own = {"llmexport.runtime.bundle", "llmexport.runtime.bundle.names"}
    assert {n for n in imports_of(ROOT / "runtime/bundle/kv.py") if n.split(".")[0] not in _stdlib()} <= own


def test_the_exporter_reads_and_writes_bundles_through_the_format_module():
    """No exporter file writes manifest.json or weights.bin itself, or names the old module."""
    bad = []
    for path in _files("exporter"):
        text = path.read_text()
        if "json.dumps" in text or "io_names" in text or "manifest.json\"" in text:
            bad.append(path.name)
    assert bad == []


def test_the_import_reader_resolves_relative_imports():
    """The checks above would pass vacuously if relative imports were misread."""
    names = imports_of(ROOT / "runtime/backends/onnxruntime.py")
    assert "llmexport.runtime.bundle.Bundle" in names and "llmexport.runtime.backends.base.Backend" in names


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names) | {"__future__"}
