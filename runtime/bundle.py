"""Reading a bundle: manifest.json and the files it names (numpy only, no torch).

The manifest is the contract a C/C++ host can drive the graphs from; README documents it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

FORMAT = "llmexport-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Element types of weights.bin by bundle dtype; numpy has no bfloat16, so those are raw uint16 bits.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def read_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise LLMExportError(f"bundle {bundle_dir} does not exist; create one with `llmexport onnx --out {bundle_dir}`")
    if not path.is_file():
        raise LLMExportError(f"{bundle_dir} is not a bundle: no {MANIFEST}; create one with `llmexport onnx`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMExportError(f"cannot read {path}: {e}; re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LLMExportError(f"{path} is not an llmexport manifest; re-export the bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LLMExportError(
            f"{path} has format version {manifest.get('format_version')!r}; this llmexport reads version "
            f"{FORMAT_VERSION}: re-export the bundle with this version"
        )
    return manifest


def read_json(path: Path | None) -> dict | None:
    """A JSON object from a bundle or checkpoint side file (None for no path or a non-object)."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMExportError(f"cannot read {path}: {e}") from None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, bundle_dir: str | Path) -> "Bundle":
        bundle = cls(Path(bundle_dir), read_manifest(bundle_dir))
        try:
            files = [g["file"] for g in bundle.manifest["graphs"].values()] + [bundle.manifest["weights"]["file"]]
            files += [f for f in (bundle.manifest.get("tokenizer"), *bundle._chat_files().values(),
                                  bundle._generation().get("file")) if f]
            bundle.config["vocab_size"], bundle.max_batch, bundle.max_seq_len  # noqa: B018  (fields present)
        except (KeyError, TypeError, AttributeError) as e:
            raise LLMExportError(f"{bundle.path / MANIFEST} lacks or garbles field {e}; re-export the bundle") from None
        for file in files:
            if not bundle.file(file).is_file():
                raise LLMExportError(f"bundle {bundle.path} is missing {file}; re-export the bundle")
        weights = bundle.weights_path
        if weights.stat().st_size != bundle.manifest["weights"]["bytes"]:
            raise LLMExportError(f"{weights} has {weights.stat().st_size} bytes, the manifest says "
                                 f"{bundle.manifest['weights']['bytes']}: the file is truncated or replaced; re-export")
        return bundle

    @property
    def config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def max_batch(self) -> int:
        return int(self.manifest["limits"]["max_batch"])

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["limits"]["max_seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["cache"]["num_layers"])

    @property
    def cache_in_place(self) -> bool:
        return bool(self.manifest["cache"]["in_place"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest.get("eos_token_ids") or ())

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.manifest["cache"]["shape"][1:])

    def file(self, name: str) -> Path:
        """A file the manifest names; refused unless it resolves (after symlinks) inside the bundle."""
        if not isinstance(name, str) or not name or Path(name).is_absolute():
            raise LLMExportError(f"{self.path / MANIFEST} names file {name!r}: only relative paths inside the "
                                 f"bundle are allowed; re-export the bundle")
        path = (self.path / name).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise LLMExportError(f"{self.path / MANIFEST} names file {name!r}, which resolves outside the bundle "
                                 f"({path}); refusing to read it")
        return path

    def graph_path(self, phase: str) -> Path:
        return self.file(self.manifest["graphs"][phase]["file"])

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """Every tensor of weights.bin, by graph initializer name, as a read-only view of one
        memory map shared by every backend of this bundle (bfloat16 as raw uint16 bits)."""
        blob = np.memmap(self.weights_path, dtype=np.uint8, mode="r")
        dtype = np.dtype(NUMPY_DTYPES[self.dtype])
        return {name: np.frombuffer(blob, dtype=dtype, count=int(np.prod(t["shape"], dtype=np.int64)),
                                    offset=t["offset"]).reshape(t["shape"])
                for name, t in self.manifest["weights"]["tensors"].items()}

    @property
    def weights_path(self) -> Path:
        return self.file(self.manifest["weights"]["file"])

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.get("tokenizer")
        return self.file(name) if name else None

    def _chat_files(self) -> dict:
        chat = self.manifest.get("chat") or {}
        return {k: chat.get(k) for k in ("template", "tokenizer_config", "special_tokens_map")}

    def _generation(self) -> dict:
        return self.manifest.get("generation") or {}

    def chat_paths(self) -> dict[str, Path | None]:
        """chat_template.jinja, tokenizer_config.json, special_tokens_map.json where the bundle has them."""
        return {k: self.file(v) if v else None for k, v in self._chat_files().items()}

    @property
    def generation_defaults(self) -> dict:
        """SamplingParams fields from the checkpoint's generation_config.json (empty without one)."""
        return dict(self._generation().get("defaults") or {})
