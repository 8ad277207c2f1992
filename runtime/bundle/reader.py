"""Reading a bundle: manifest.json and the files it names (numpy only, no torch).

Opening checks, cheaply and before anything is mapped: the manifest's own digest and fields,
that every file it names resolves inside the bundle and has its recorded size, and that the
weight index fits the weight file. `check_integrity()` also hashes every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

from . import integrity, paths
from .kv import KVLayout
from .manifest import MANIFEST, Manifest, read_manifest
from .quant import Quantization
from .weights import check_index, map_weights


def read_json(path: Path | None) -> dict | None:
    """A JSON object from a bundle or checkpoint side file (None for no path or a non-object)."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LLMExportError(f"cannot read {path}: {type(e).__name__}: {str(e)[:120]}") from None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, bundle_dir: str | Path, check_integrity: bool = False) -> "Bundle":
        """Open and check a bundle; `check_integrity` also verifies every file's sha256."""
        bundle = cls(Path(bundle_dir), read_manifest(bundle_dir))
        where = str(bundle.path / MANIFEST)
        record = bundle.manifest.integrity
        named = bundle.named_files()
        for name in [*named, *record.files]:
            bundle.file(name)
        missing = [n for n in named if n not in record.files]
        if missing:
            raise LLMExportError(f"{where}: {missing[0]} has no integrity record; re-export the bundle")
        integrity.check_sizes(record, bundle.file, where)
        weights = bundle.manifest.weights
        if weights.bytes != record.files[weights.file].bytes:
            raise LLMExportError(f"{where}: weights.bytes differs from the recorded file size; re-export the bundle")
        check_index(weights.tensors, weights.bytes, where)
        if check_integrity:
            bundle.check_integrity()
        return bundle

    def check_integrity(self, workers: int | None = None) -> None:
        """Hash every file (chunks of large files in parallel) against the manifest's record."""
        integrity.check_digests(self.manifest.integrity, self.file, str(self.path), workers)

    def named_files(self) -> list[str]:
        """Every file the manifest refers to (graphs, weights, tokenizer, chat, generation, genai config, engines)."""
        m = self.manifest
        names = [g.file for g in m.graphs.values()] + [m.weights.file, m.tokenizer]
        names += [*m.chat.to_dict().values(), m.generation.file, m.genai_config, *(e.file for e in m.engines.values())]
        return [n for n in names if n]

    @property
    def config(self) -> dict:
        """The model's config (model.config.ModelConfig.to_dict())."""
        return self.manifest.model.config

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def max_batch(self) -> int:
        return self.manifest.limits.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.manifest.limits.max_seq_len

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def kv(self) -> KVLayout:
        """The KV cache layout: buffer shape, order, names, in place or not."""
        return self.manifest.cache

    @property
    def num_layers(self) -> int:
        return self.kv.num_layers

    @property
    def cache_in_place(self) -> bool:
        return self.kv.in_place

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.manifest.eos_token_ids

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return self.kv.shape(batch)

    def file(self, name: str) -> Path:
        """A file the manifest names; refused unless it resolves (after symlinks) inside the bundle."""
        return paths.inside(self.path, name, str(self.path / MANIFEST))

    def graph_path(self, phase: str) -> Path:
        return self.file(self.manifest.graphs[phase].file)

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """Every tensor of weights.bin, by graph initializer name, as a read-only view of one
        memory map shared by every backend of this bundle (bfloat16 as raw uint16 bits)."""
        return map_weights(self.weights_path, self.manifest.weights.tensors)

    def release(self) -> None:
        """Forget the memory map of weights.bin (`weights`): it is unmapped, and its resident
        pages returned, once no backend holds a view of it. Reading `weights` maps it again."""
        self.__dict__.pop("weights", None)

    @property
    def quantization(self) -> Quantization | None:
        """The quantization record (None for a float bundle): method, accuracy level, layout, and
        per checkpoint weight its scheme and the names of its codes, scales, offsets and rows."""
        return self.manifest.quantization

    @property
    def weights_path(self) -> Path:
        return self.file(self.manifest.weights.file)

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.tokenizer
        return self.file(name) if name else None

    def chat_paths(self) -> dict[str, Path | None]:
        """chat_template.jinja, tokenizer_config.json, special_tokens_map.json where the bundle has them
        (keys: template, tokenizer_config, special_tokens_map)."""
        return {k: self.file(v) if v else None for k, v in self.manifest.chat.to_dict().items()}

    @property
    def generation_defaults(self) -> dict:
        """SamplingParams fields from the checkpoint's generation_config.json (empty without one)."""
        return dict(self.manifest.generation.defaults or {})
