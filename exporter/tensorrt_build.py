"""`build_tensorrt`: a `tensorrt`-target bundle's graph -> one TensorRT engine with two profiles.

UNTESTED: TensorRT cannot be installed where this project is developed and tested. This follows
the documented TensorRT 10 Python API (shared/briefs/tensorrt.md, sections 1 and 4) and is kept
thin; its tests skip with the reason when `tensorrt` is not importable.

One engine, two optimisation profiles, one set of weights: profile 0 for prefill (batch 1..max,
sequence 1..max_seq_len) and profile 1 for decode (sequence 1, `extra_memory_target=0`), both
built from prefill.onnx, which takes any S >= 1. The network is strongly typed (the ONNX dtypes
decide precision). The attention nodes are `llmexport::LlmexportAttention` local functions:
with a plugin library of that name given, TensorRT (>= 10.7) uses the plugin; without one the
parser imports the function body (correct, unfused).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llmexport import LLMExportError
from llmexport.runtime.backends.tensorrt import import_tensorrt
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.manifest import EngineRecord, update_manifest

ENGINE_DIR = "engines"


def build_tensorrt(bundle_dir: str | Path, *, optimization_level: int = 3, workspace_gib: int = 8,
                   plugin_library: str | Path | None = None) -> Path:
    """Build `engines/tensorrt.plan` (+ timing cache) and record it in manifest.json."""
    bundle = Bundle.open(bundle_dir)
    if bundle.target != "tensorrt":
        raise LLMExportError(f"bundle {bundle.path} was exported with --target {bundle.target}; "
                             f"re-export it with --target tensorrt")
    if not 0 <= optimization_level <= 5:
        raise LLMExportError(f"--optimization-level {optimization_level} must be in 0..5")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_library:
        trt.get_plugin_registry().load_library(str(plugin_library))
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.graph_path(io.PREFILL))):  # external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LLMExportError(f"TensorRT could not parse {bundle.graph_path(io.PREFILL)}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    config.builder_optimization_level = optimization_level
    out = bundle.path / ENGINE_DIR
    out.mkdir(exist_ok=True)
    cache_path = out / "tensorrt.timing"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for phase in (io.PREFILL, io.DECODE):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in _profile_shapes(bundle, phase).items():
            profile.set_shape(name, lo, opt, hi)
        if phase == io.DECODE:
            profile.extra_memory_target = 0.0
        config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LLMExportError("TensorRT failed to build the engine; rerun with a lower --optimization-level "
                             "or more --workspace-gib, and see TensorRT's log above")
    engine_path = out / "tensorrt.plan"
    engine_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    _record(bundle, EngineRecord(f"{ENGINE_DIR}/tensorrt.plan", f"{ENGINE_DIR}/tensorrt.timing",
                                 {io.PREFILL: 0, io.DECODE: 1}, trt.__version__, optimization_level,
                                 str(plugin_library) if plugin_library else None))
    return engine_path


def _profile_shapes(bundle: Bundle, phase: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every dynamic input for one profile."""
    b, t = bundle.max_batch, bundle.max_seq_len
    seq = (1, 1, 1) if phase == io.DECODE else (1, min(512, t), t)
    batch = (1, b, b) if phase == io.DECODE else (1, 1, b)
    shapes = {name: tuple((n, s) for n, s in zip(batch, seq)) for name in (io.INPUT_IDS, io.POSITION_IDS)}
    shapes[io.SEQ_LENS] = tuple((n,) for n in batch)
    # logits at one position per row (the last token) unless scoring or checking proposals: every position
    picked = (1, 1, 1) if phase == io.DECODE else (1, 1, t)
    shapes[io.LOGITS_INDEX] = tuple((n, k) for n, k in zip(batch, picked))
    for name in bundle.kv.inputs:
        shapes[name] = tuple(bundle.kv.shape(n) for n in batch)
    return shapes


def _record(bundle: Bundle, engine: EngineRecord) -> None:
    """Add the engine (and its hashes) to manifest.json atomically, through the format module."""
    manifest = replace(bundle.manifest, engines={**bundle.manifest.engines, "tensorrt": engine})
    update_manifest(bundle.path, manifest, new_files=[engine.file, engine.timing_cache])
