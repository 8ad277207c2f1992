"""manifest.json: reading (with every field the runtime uses validated) and writing.

The schema is documented in README ("The bundle: a contract a C/C++ host can drive"). Version
2 added the integrity record; older bundles are refused with the fix (re-export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmexport import LLMExportError

from . import integrity
from .quant import LAYOUTS, stored_tensors
from .weights import NUMPY_DTYPES

FORMAT = "llmexport-bundle"
FORMAT_VERSION = 4  # 3: `ort` graphs take total_seq_len; 4: prefill takes logits_index
MANIFEST = "manifest.json"


def read_manifest(bundle_dir: str | Path) -> dict:
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
    check_fields(manifest, str(path))
    return manifest


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def check_fields(m: dict, where: str) -> None:
    """The numbers and names the runtime relies on, checked against each other before use."""
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
        need(all(isinstance(m["graphs"][p]["file"], str) for p in ("prefill", "decode")), "graph files missing")
        need(all(type(t) is int and 0 <= t < config["vocab_size"] for t in m.get("eos_token_ids") or []),
             f"eos_token_ids {m.get('eos_token_ids')!r} are not token ids")
        quant = m.get("quantization")
        if quant is not None:
            need(isinstance(quant["tensors"], dict), "quantization record is malformed")
            for name, record in quant["tensors"].items():
                need(record.get("bits") in (4, 8) and _positive_int(record.get("block_size"))
                     and isinstance(record.get("symmetric"), bool) and record.get("layout") in LAYOUTS
                     and isinstance(record.get("search"), bool) and isinstance(record.get("integer_zero_point"), bool)
                     and bool(record.get("offsets") or record.get("zero_points")) != record["symmetric"],
                     f"quantized weight {name!r} has a malformed scheme")
                need(all(s in weights["tensors"] for s in stored_tensors(record)) and len(record["shape"]) == 2
                     and all(_positive_int(d) for d in record["shape"]),
                     f"quantized weight {name!r} names tensors the weight index lacks")
        need(isinstance(m["integrity"]["files"], dict) and _positive_int(m["integrity"]["chunk_bytes"]),
             "integrity record is malformed")
        for name, entry in m["integrity"]["files"].items():
            need(type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)
                 and isinstance(entry.get("chunks", []), list), f"integrity entry for {name!r} is malformed")
    except (KeyError, TypeError, AttributeError) as e:
        raise LLMExportError(f"{where} lacks or garbles field {e}; re-export the bundle") from None


def write_manifest(bundle_dir: Path, manifest: dict, files: list[str]) -> None:
    """Write manifest.json with the integrity record of `files` (hashed now) and of itself,
    atomically (a temporary file renamed into place)."""
    content = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    content["integrity"] = integrity.describe(bundle_dir, files)
    store(bundle_dir, content)


def update_manifest(bundle_dir: Path, manifest: dict, changes: dict, new_files: list[str]) -> dict:
    """`manifest` with `changes` applied and `new_files` added to its integrity record (files
    already recorded keep their digests), written atomically; returns what was written."""
    content = {**manifest, **changes}
    record = dict(content["integrity"])
    record["files"] = {**record["files"], **integrity.describe(bundle_dir, new_files, record["chunk_bytes"])["files"]}
    content["integrity"] = record
    store(bundle_dir, content)
    return content


def store(bundle_dir: Path, content: dict) -> None:
    """Write `content` as manifest.json with a fresh digest of itself (its file records as given)."""
    content["integrity"] = {k: v for k, v in content["integrity"].items() if k != "manifest_sha256"}
    content["integrity"]["manifest_sha256"] = integrity.canonical_digest(content)
    tmp = bundle_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=2), encoding="utf-8")
    os.replace(tmp, bundle_dir / MANIFEST)
