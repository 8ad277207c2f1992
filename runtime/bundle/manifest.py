"""manifest.json as typed records: built by the exporter, read (every field checked) by the runtime.

The schema is documented in docs/bundle-format.md. Each record is a frozen dataclass with
to_dict()/from_dict(), and to_dict() writes the keys in the order bundles have always had, so
the file on disk is what it was when these were dict literals. Version 2 added the integrity
record; a bundle of another version is refused with the fix (re-export).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmexport import LLMExportError

from . import integrity
from . import names as io
from .integrity import Integrity
from .kv import KVLayout
from .quant import Quantization
from .weights import NUMPY_DTYPES, WeightIndex

FORMAT = "llmexport-bundle"
FORMAT_VERSION = 4  # 3: `ort` graphs take total_seq_len; 4: prefill takes logits_index
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelRecord:
    name: str
    config: dict  # model.config.ModelConfig.to_dict()
    seed: int | None = None  # the random weights' seed; None when exported from a checkpoint

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelRecord":
        return cls(d["name"], d["config"], d.get("seed"))


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_seq_len: int

    def to_dict(self) -> dict:
        return {"max_batch": self.max_batch, "max_seq_len": self.max_seq_len}


@dataclass(frozen=True)
class ChatFiles:
    """The checkpoint's chat files copied into the bundle (file names; None where it had none)."""
    template: str | None = None
    tokenizer_config: str | None = None
    special_tokens_map: str | None = None

    def to_dict(self) -> dict:
        return {"template": self.template, "tokenizer_config": self.tokenizer_config,
                "special_tokens_map": self.special_tokens_map}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ChatFiles":
        d = d or {}
        return cls(d.get("template"), d.get("tokenizer_config"), d.get("special_tokens_map"))


@dataclass(frozen=True)
class Generation:
    """generation_config.json's file name and the SamplingParams fields it implies."""
    file: str | None = None
    defaults: dict | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "defaults": self.defaults or {}}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Generation":
        d = d or {}
        return cls(d.get("file"), dict(d.get("defaults") or {}))


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: symbolic dims are strings (names.py's BATCH, SEQUENCE, PICKED)."""
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphRecord:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    aliases: dict[str, str]  # each present output -> the past input it updates (the KV layout's)
    ops: tuple[str, ...]  # "domain::op" of every node

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "aliases": self.aliases, "ops": list(self.ops)}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphRecord":
        return cls(d["file"], tuple(map(TensorSpec.from_dict, d["inputs"])),
                   tuple(map(TensorSpec.from_dict, d["outputs"])), dict(d["aliases"]), tuple(d["ops"]))


@dataclass(frozen=True)
class EngineRecord:
    """A built TensorRT engine (exporter/tensorrt_build.py; UNTESTED, no TensorRT here)."""
    file: str
    timing_cache: str
    profiles: dict[str, int]  # phase -> optimisation profile index
    tensorrt: str  # the version that built it
    optimization_level: int
    plugin_library: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "timing_cache": self.timing_cache, "profiles": self.profiles,
                "tensorrt": self.tensorrt, "optimization_level": self.optimization_level,
                "plugin_library": self.plugin_library}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineRecord":
        return cls(d["file"], d["timing_cache"], dict(d["profiles"]), d["tensorrt"], d["optimization_level"],
                   d.get("plugin_library"))


@dataclass(frozen=True)
class ExportRecord:
    seconds: float
    torch: str
    onnx: str
    opset: int | None

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "torch": self.torch, "onnx": self.onnx, "opset": self.opset}


@dataclass(frozen=True)
class Manifest:
    llmexport_version: str
    model: ModelRecord
    dtype: str
    target: str
    limits: Limits
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # generation_config.json's, then config.json's
    tokenizer: str | None
    chat: ChatFiles
    generation: Generation
    cache: KVLayout
    quantization: Quantization | None
    weights: WeightIndex
    graphs: dict[str, GraphRecord]  # by phase
    engines: dict[str, EngineRecord]  # by backend, empty until built
    export: ExportRecord
    integrity: Integrity | None = None  # None until written (write_manifest hashes the files)
    genai_config: str | None = None  # onnxruntime-genai's config of the genai graph (`ort` bundles; genai.py)

    def to_dict(self) -> dict:
        m = {"format": FORMAT, "format_version": FORMAT_VERSION, "llmexport_version": self.llmexport_version,
             "model": self.model.to_dict(), "dtype": self.dtype, "target": self.target,
             "limits": self.limits.to_dict(), "bos_token_id": self.bos_token_id,
             "eos_token_ids": list(self.eos_token_ids), "tokenizer": self.tokenizer, "chat": self.chat.to_dict(),
             "generation": self.generation.to_dict(), "cache": self.cache.to_dict(self.dtype),
             "quantization": self.quantization.to_dict() if self.quantization else None,
             "weights": self.weights.to_dict(), "graphs": {p: g.to_dict() for p, g in self.graphs.items()},
             "genai_config": self.genai_config,
             "engines": {b: e.to_dict() for b, e in self.engines.items()}, "export": self.export.to_dict()}
        return m | ({"integrity": self.integrity.to_dict()} if self.integrity else {})

    def __getitem__(self, key: str):
        """JSON-style reads (`manifest["model"]["name"]`), kept for runtime/serve/app.py and
        benchmarks/serving.py and prompt_reuse.py, which are being edited elsewhere; everything
        else reads the attributes."""
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, m: dict, where: str) -> "Manifest":
        """The records of a manifest's JSON (format and version already checked), with the numbers
        and names the runtime relies on checked against each other before use."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise LLMExportError(f"{where}: {what}; re-export the bundle")

        try:
            config, limits, cache, weights = m["model"]["config"], m["limits"], m["cache"], m["weights"]
            need(m["dtype"] in NUMPY_DTYPES, f"unknown dtype {m['dtype']!r}")
            need(isinstance(m["target"], str), "target is not a string")
            need(_positive_int(limits["max_batch"]) and _positive_int(limits["max_seq_len"]),
                 f"limits {limits!r} are not positive integers")
            need(_positive_int(config["vocab_size"]), f"vocab_size {config['vocab_size']!r} is not a positive integer")
            shape = cache["shape"]
            need(isinstance(shape, list) and len(shape) == 4 and all(_positive_int(d) for d in shape[1:])
                 and shape[2] == limits["max_seq_len"], f"cache shape {shape!r} does not fit max_seq_len")
            need(_positive_int(cache["num_layers"]) and cache["num_layers"] == config["num_layers"],
                 f"cache num_layers {cache['num_layers']!r} differs from the model's {config['num_layers']!r}")
            need(cache["dtype"] == m["dtype"] and isinstance(cache["in_place"], bool), f"cache {cache!r} is malformed")
            need(isinstance(weights["tensors"], dict) and type(weights["bytes"]) is int, "weights index is malformed")
            need(all(isinstance(m["graphs"][p]["file"], str) for p in (io.PREFILL, io.DECODE)), "graph files missing")
            need(m.get("genai_config") is None or (isinstance(m["genai_config"], str) and io.GENAI in m["graphs"]),
                 f"genai_config {m.get('genai_config')!r} is not a file name of a bundle with a genai graph")
            eos = m.get("eos_token_ids") or []
            need(all(type(t) is int and 0 <= t < config["vocab_size"] for t in eos),
                 f"eos_token_ids {m.get('eos_token_ids')!r} are not token ids")
            index = WeightIndex.from_dict(weights, m["dtype"], where)
            quant = Quantization.from_dict(m["quantization"], where) if m.get("quantization") is not None else None
            for name, weight in (quant.tensors if quant else {}).items():
                need(all(s in index.tensors for s in weight.stored),
                     f"quantized weight {name!r} names tensors the weight index lacks")
            return cls(
                m["llmexport_version"], ModelRecord.from_dict(m["model"]), m["dtype"], m["target"],
                Limits(limits["max_batch"], limits["max_seq_len"]), m.get("bos_token_id"), tuple(eos),
                m.get("tokenizer"), ChatFiles.from_dict(m.get("chat")), Generation.from_dict(m.get("generation")),
                KVLayout.from_dict(cache), quant, index,
                {phase: GraphRecord.from_dict(g) for phase, g in m["graphs"].items()},
                {backend: EngineRecord.from_dict(e) for backend, e in (m.get("engines") or {}).items()},
                ExportRecord(**m["export"]), Integrity.from_dict(m["integrity"], where),
                genai_config=m.get("genai_config"))
        except (KeyError, TypeError, AttributeError) as e:
            raise LLMExportError(f"{where} lacks or garbles field {e}; re-export the bundle") from None


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise LLMExportError(f"bundle {bundle_dir} does not exist; create one with `llmexport onnx --out {bundle_dir}`")
    if not path.is_file():
        raise LLMExportError(f"{bundle_dir} is not a bundle: no {MANIFEST}; create one with `llmexport onnx`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LLMExportError(f"cannot read {path}: {type(e).__name__}: {str(e)[:120]}; re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LLMExportError(f"{path} is not an llmexport manifest; re-export the bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LLMExportError(
            f"{path} has format version {manifest.get('format_version')!r}; this llmexport reads version "
            f"{FORMAT_VERSION}: re-export the bundle with this version"
        )
    record = manifest.get("integrity")
    if not isinstance(record, dict) or record.get("manifest_sha256") != integrity.canonical_digest(manifest):
        raise LLMExportError(f"{path} does not match its recorded sha256: it was edited or damaged after export; "
                             f"re-copy or re-export the bundle")
    return Manifest.from_dict(manifest, str(path))


def write_manifest(bundle_dir: Path, manifest: Manifest, files: list[str]) -> None:
    """Write manifest.json with the integrity record of `files` (hashed now) and of itself,
    atomically (a temporary file renamed into place)."""
    content = manifest.to_dict()
    content["integrity"] = integrity.describe(bundle_dir, files).to_dict()
    store(bundle_dir, content)


def update_manifest(bundle_dir: Path, manifest: Manifest | dict, changes: dict | None = None,
                    new_files: list[str] = ()) -> dict:
    """`manifest` (the records, or JSON as a test edits it) with `changes` (JSON fields) applied and
    `new_files` added to its integrity record (files already recorded keep their digests),
    written atomically; returns the JSON written."""
    content = {**(manifest.to_dict() if isinstance(manifest, Manifest) else manifest), **(changes or {})}
    record = Integrity.from_dict(content["integrity"], str(bundle_dir / MANIFEST))
    content["integrity"] = record.adding(bundle_dir, list(new_files)).to_dict()
    store(bundle_dir, content)
    return content


def store(bundle_dir: Path, content: dict) -> None:
    """Write `content` as manifest.json with a fresh digest of itself (its file records as given).
    JSON, not records: tests write manifests the records would refuse, to check that reading does."""
    content["integrity"] = {k: v for k, v in content["integrity"].items() if k != "manifest_sha256"}
    content["integrity"]["manifest_sha256"] = integrity.canonical_digest(content)
    tmp = bundle_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=2), encoding="utf-8")
    os.replace(tmp, bundle_dir / MANIFEST)
