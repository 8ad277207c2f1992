"""`export_bundle`: model source -> prefill.onnx + decode.onnx + weights.bin + manifest.json
(`ort`: also genai.onnx + genai_config.json, onnxruntime-genai's decoder and config).

The chain: open the source -> trace each graph on `meta` -> stream the weights into one file
-> point every graph at it -> optimise per target -> save, check -> manifest -> rename into
place. Host memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes import common as common_passes
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

import llmexport
from llmexport import LLMExportError
from llmexport.model.config import ModelConfig, check_dtype
from llmexport.model.weights import ModelSource, open_source
from llmexport.runtime.bundle import KVLayout, read_json
from llmexport.runtime.bundle import names as io
from llmexport.runtime.bundle.genai import write_genai_config
from llmexport.runtime.bundle.manifest import (ChatFiles, ExportRecord, Generation, GraphRecord, Limits, Manifest,
                                               ModelRecord, TensorSpec, write_manifest)
from llmexport.runtime.bundle.quant import Quantization
from llmexport.runtime.bundle.weights import WeightIndex
from llmexport.runtime.bundle.writer import check_out_dir, staging
from llmexport.runtime.generation_config import eos_token_ids, sampling_defaults

from . import attention_function
from .contrib_schemas import register_contrib_schemas
from .quantize import QuantConfig, check_quant, layout, quantize_graph
from .targets import check_target, graph_phases, writes_cache_in_place
from .trace import trace
from .weights_file import IR_DTYPES, attach_weights, fold_weight_transposes, write_weights

IR_VERSION = 10  # ONNX Runtime 1.31 refuses IR 14, onnx 1.23's default
# Constants the optimiser may fold into the graph file; anything larger (a Range over the cache
# capacity, say) stays a computation, so graphs do not grow with max_seq_len.
MAX_FOLDED_ELEMENTS = 1024
DEFAULT_MAX_SEQ_LEN = 4096
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def resolve_max_seq_len(config: ModelConfig, max_seq_len: int | None) -> int:
    limit = config.max_position_embeddings
    if max_seq_len is None:
        return min(limit, DEFAULT_MAX_SEQ_LEN)
    if not 0 < max_seq_len <= limit:
        raise LLMExportError(f"--max-seq-len {max_seq_len} is outside 1..{limit} (the model's "
                             f"max_position_embeddings); pass a value in that range")
    return max_seq_len


def export_bundle(
    model: str | Path | ModelSource,
    out: str | Path,
    *,
    target: str = "ort",
    dtype: str = "float32",
    max_seq_len: int | None = None,
    max_batch: int = 8,
    force: bool = False,
    seed: int = 0,
    quant: QuantConfig | None = None,
    progress: Progress = _no_progress,
) -> Path:
    """Export `model` (preset name, checkpoint directory or ModelSource) as a bundle at `out`;
    `quant` stores the linear weights block-quantized (exporter/quantize.py)."""
    started = time.perf_counter()
    check_dtype(dtype)
    check_target(target, dtype)
    if quant is not None:
        check_quant(quant, target, dtype)
    if max_batch < 1:
        raise LLMExportError(f"--max-batch {max_batch} must be at least 1")
    out = Path(out)
    check_out_dir(out, force)
    source = model if isinstance(model, ModelSource) else open_source(model, seed)
    config = source.config
    max_seq_len = resolve_max_seq_len(config, max_seq_len)
    cache = KVLayout.of(config, max_seq_len, in_place=writes_cache_in_place(target))

    graphs, quantized = {}, {}
    phases = graph_phases(target)
    for i, phase in enumerate(phases):
        progress("trace", i, len(phases))
        graphs[phase] = _quiet(trace, config, dtype, max_seq_len, max_batch, phase, target)
        fold_weight_transposes(graphs[phase])
        if quant is not None:
            quantized[phase] = quantize_graph(graphs[phase], config, quant, IR_DTYPES[dtype], target)
        if target != "ort":
            attention_function.add_to(graphs[phase])
    progress("trace", len(phases), len(phases))
    if quant is not None and any(quantized[p] != quantized[io.PREFILL] for p in phases):
        raise LLMExportError("internal: the graphs disagree on their quantized weights")
    names = set(graphs[io.PREFILL].graph.initializers)
    if any(set(graphs[p].graph.initializers) != names for p in phases):
        raise LLMExportError("internal: the graphs disagree on their weights")

    with staging(out, force) as tmp:
        done = 0

        def on_tensor(name: str) -> None:
            nonlocal done
            done += 1
            progress("weights", done, len(names))

        entries = write_weights(source, dtype, max_seq_len, names, tmp / io.WEIGHTS_FILE, on_tensor,
                                quantized.get(io.PREFILL))
        graph_files = {}
        for i, (phase, graph) in enumerate(graphs.items()):
            progress("optimize", i, len(graphs))
            attach_weights(graph, entries, dtype, tmp)
            graph = _optimize(graph, target, phase)
            _check_weights_kept(graph, names, phase)
            graph.ir_version = IR_VERSION
            path = tmp / f"{phase}.onnx"
            ir.save(graph, path)
            register_contrib_schemas()
            onnx.checker.check_model(str(path), full_check=True)
            graph_files[phase] = _graph_manifest(graph, path.name, cache)
        progress("optimize", len(graphs), len(graphs))
        side = _copy_side_files(source, tmp)
        files = [*(g.file for g in graph_files.values()), io.WEIGHTS_FILE, *source.side_files()]
        manifest = Manifest(
            llmexport_version=llmexport.__version__,
            model=ModelRecord(source.name, config.to_dict(), None if source.checkpoint_dir else seed),
            dtype=dtype,
            target=target,
            limits=Limits(max_batch, max_seq_len),
            bos_token_id=config.bos_token_id,
            **side,
            cache=cache,
            quantization=None if quant is None else Quantization(quant.method, quant.accuracy_level, layout(target),
                                                                 quantized[io.PREFILL]),
            weights=WeightIndex(io.WEIGHTS_FILE, (tmp / io.WEIGHTS_FILE).stat().st_size, dict(sorted(entries.items()))),
            graphs=graph_files,
            engines={},
            export=ExportRecord(round(time.perf_counter() - started, 3), torch.__version__, onnx.__version__,
                                graphs[io.PREFILL].opset_imports.get("", None)),
        )
        if io.GENAI in graph_files:
            generation = read_json(tmp / manifest.generation.file) if manifest.generation.file else None
            manifest = replace(manifest, genai_config=write_genai_config(tmp, manifest, generation or {}))
            files.append(manifest.genai_config)
        write_manifest(tmp, manifest, files)
    return out


def _copy_side_files(source: ModelSource, bundle_dir: Path) -> dict:
    """Copy the checkpoint's tokenizer, chat template and generation config into the bundle;
    returns the Manifest fields naming them. EOS ids: generation_config.json's (what transformers'
    generate stops on), then config.json's."""
    files = source.side_files()
    for name, path in files.items():
        shutil.copy(path, bundle_dir / name)
    generation = read_json(files.get("generation_config.json"))
    if generation is None and "generation_config.json" in files:
        raise LLMExportError(f"{files['generation_config.json']} is not a JSON object; fix or remove it")
    generation = generation or {}
    eos = dict.fromkeys(eos_token_ids(generation) + source.config.eos_token_ids)
    present = lambda name: name if name in files else None  # noqa: E731
    return {
        "eos_token_ids": tuple(eos),
        "tokenizer": present("tokenizer.json"),
        "chat": ChatFiles(present("chat_template.jinja"), present("tokenizer_config.json"),
                          present("special_tokens_map.json")),
        "generation": Generation(present("generation_config.json"), sampling_defaults(generation)),
    }


_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
                ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}


def io_spec(values) -> tuple[TensorSpec, ...]:
    """Graph inputs or outputs as the manifest records them, symbolic dims as strings."""
    return tuple(TensorSpec(v.name, _DTYPE_NAMES[v.dtype], tuple(d if isinstance(d, int) else str(d) for d in v.shape))
                 for v in values)


def _graph_manifest(graph: ir.Model, file: str, cache: KVLayout) -> GraphRecord:
    return GraphRecord(file, io_spec(graph.graph.inputs), io_spec(graph.graph.outputs), cache.aliases,
                       tuple(sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph.graph})))


def _optimize(model: ir.Model, target: str, phase: str) -> ir.Model:
    """onnxscript's optimiser minus the passes that would touch weights (deduplicating equal
    initializers, folding nodes that read them): the graphs must keep pointing at weights.bin.
    The `ort` target also gets ONNX Runtime's fused RMSNorm ops (SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization)."""
    weights = set(model.graph.initializers.values())

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(v in weights for v in node.inputs) else None

    # portable inlines the attention function into plain ops; tensorrt keeps it for the plugin.
    inline = [common_passes.InlinePass()] if target != "tensorrt" else []
    cleanup = ir.passes.Sequential(
        *inline,
        ir.passes.PassManager([_FoldAndRewrite(should_fold)], steps=2, early_stop=False),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.ClearMetadataAndDocStringPass(),  # torch's per-node stack traces
    )
    cleanup(model)
    if target == "ort":
        fuse_rms_normalization(model)
        fuse_skip_rms_normalization(model)
        (_total_seq_len_from_mask if phase == io.GENAI else _total_seq_len_input)(model)
        cleanup(model)
    return model


class _FoldAndRewrite(ir.passes.InPlacePass):
    """onnxscript's constant folding (small results only, never a node that reads a weight), then
    its default rewrite rules, through their public functions. Run twice: a rewrite can make
    more constants foldable (a second round of an unchanged graph changes nothing)."""

    def __init__(self, should_fold: Callable[[ir.Node], bool | None]):
        super().__init__()
        self.should_fold = should_fold

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = fold_constants_ir(model, onnx_shape_inference=True, input_size_limit=MAX_FOLDED_ELEMENTS,
                                   output_size_limit=MAX_FOLDED_ELEMENTS, should_fold=self.should_fold)
        rewrite(model)  # the default rules; also removes what they leave unused
        return ir.passes.PassResult(model, modified=folded.modified)


def _total_seq_len_input(model: ir.Model) -> None:
    """GroupQueryAttention's total_sequence_length from a graph input (int32 scalar, fed on the
    host) instead of Cast(ReduceMax(seq_lens)): ONNX Runtime's CUDA kernel reads it on the host, so
    computing it on the device puts a device-to-host copy in the graph, and CUDA-graph capture
    refuses graphs with copies (issue #14 item 2)."""
    total = ir.Value(name=io.TOTAL_SEQ_LEN, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    model.graph.inputs.append(total)
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.replace_input_with(io.GQA_TOTAL_SEQ_LEN_INPUT, total)


def _total_seq_len_from_mask(model: ir.Model) -> None:
    """genai.onnx: GroupQueryAttention's total_sequence_length is the attention mask's width, as
    onnxruntime-genai's model builder derives it (a shape, known on the host: no device-to-host
    copy; under CUDA-graph capture genai's mask is max_length wide and real lengths travel in
    seqlens_k, the mask's row sums)."""
    mask = next(v for v in model.graph.inputs if v.name == io.ATTENTION_MASK)
    width = ir.node("Shape", [mask], attributes={"start": 1, "end": 2})  # (1,)
    scalar = ir.node("Squeeze", [width.outputs[0]])  # ()
    total = ir.node("Cast", [scalar.outputs[0]], attributes={"to": int(ir.DataType.INT32)})
    model.graph.insert_before(next(iter(model.graph)), [width, scalar, total])
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.replace_input_with(io.GQA_TOTAL_SEQ_LEN_INPUT, total.outputs[0])


def _check_weights_kept(graph: ir.Model, names: set[str], phase: str) -> None:
    """Optimisation may lift small constants to initializers, never drop or copy a weight."""
    inits = graph.graph.initializers
    extra = [n for n in set(inits) - names if inits[n].const_value.size > MAX_FOLDED_ELEMENTS]
    if not names <= set(inits) or extra:
        raise LLMExportError(f"internal: optimising {phase} changed its weights "
                             f"(lost {sorted(names - set(inits))[:3]}, added {extra[:3]})")


def _quiet(fn, *args):
    """torch.onnx logs registry warnings (torchvision ops, ...) that mean nothing to our users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        logger.setLevel(level)
