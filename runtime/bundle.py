"""Reading a bundle: manifest.json and the files it names (numpy only, no torch).

The manifest is the contract a C/C++ host can drive the graphs from; README documents it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmexport import LLMExportError

FORMAT = "llmexport-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, bundle_dir: str | Path) -> "Bundle":
        bundle = cls(Path(bundle_dir), read_manifest(bundle_dir))
        try:
            files = [g["file"] for g in bundle.manifest["graphs"].values()] + [bundle.manifest["weights"]["file"]]
            files += [bundle.manifest["tokenizer"]] if bundle.manifest.get("tokenizer") else []
            bundle.config["vocab_size"], bundle.max_batch, bundle.max_seq_len  # noqa: B018  (fields present)
        except (KeyError, TypeError) as e:
            raise LLMExportError(f"{bundle.path / MANIFEST} lacks field {e}; re-export the bundle") from None
        for file in files:
            if not (bundle.path / file).is_file():
                raise LLMExportError(f"bundle {bundle.path} is missing {file}; re-export the bundle")
        weights = bundle.path / bundle.manifest["weights"]["file"]
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

    def graph_path(self, phase: str) -> Path:
        return self.path / self.manifest["graphs"][phase]["file"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest["weights"]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.get("tokenizer")
        return self.path / name if name else None
