"""`bisect_bundle`: the first layer and op where the bundle's prefill graph leaves the reference.

One prompt (batch 1, no padding, so every position is a real token) runs through the torch
reference with forward hooks on the modules that own weights, and through a copy of
prefill.onnx in which the matching values are marked as extra graph outputs (what
`polygraphy run --onnx-outputs mark all` does, restricted to values that have a torch
counterpart). The copy lives in memory only; the bundle is never written.

A module's ONNX counterpart is found through the weight it owns, so it survives fusion and
renaming: the node that consumes `<module>.weight` (stored transposed as `<module>.weight.T`
for MatMul) produces the module's output (Gather: embedding; Mul, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization: RMSNorm; MatMul/Gemm, then the Add of `<module>.bias` when
there is one: linear). A linear's input is compared too when it is a new value (o_proj's input
is the attention op's output, down_proj's the SwiGLU product). A decoder layer's output is the
residual Add after down_proj (output 3 of ONNX Runtime's fused SkipSimplifiedLayerNormalization).

Each probe is judged by the verify statistic (max |onnx - ref| / max |ref|) against the
dtype's cache tolerance; the first probe past it is the divergence. Independently, any ONNX
value that is NaN/Inf or above FP16_LIMIT in magnitude is flagged as overflow: float16 tops
out at 65,504, so values near that are where a float16 export breaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from torch import nn

from llmexport.model.llama import DecoderLayer, RMSNorm
from llmexport.runtime.backends.onnxruntime import create_session, ort_weights
from llmexport.runtime.backends.torch import TorchBackend
from llmexport.runtime.bundle import NUMPY_DTYPES, Bundle
from llmexport.runtime.bundle import names as io

from .verify import TOLERANCES

FP16_LIMIT = 60_000.0
BISECT_TOKENS = 16
_NORM_OPS = {"Mul", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


@dataclass
class Probe:
    label: str  # module path, "+ (input)" for a linear's input
    layer: str  # "embed", "0", "1", ..., "head"
    max_ref: float
    max_onnx: float
    scaled: float  # max |onnx - ref| / max |ref|
    nonfinite: int  # NaN/Inf elements on the ONNX side
    diverges: bool
    overflow: bool


@dataclass
class BisectReport:
    bundle: str
    dtype: str
    tolerance: float
    tokens: int
    probes: list[Probe]

    @property
    def first_divergence(self) -> Probe | None:
        return next((p for p in self.probes if p.diverges), None)

    @property
    def first_overflow(self) -> Probe | None:
        return next((p for p in self.probes if p.overflow), None)

    def layers(self) -> list[tuple[str, Probe]]:
        """(layer, its worst probe) in order: the layer-by-layer table."""
        worst: dict[str, Probe] = {}
        for p in self.probes:
            if p.layer not in worst or (p.diverges, p.overflow, p.scaled) > (
                    worst[p.layer].diverges, worst[p.layer].overflow, worst[p.layer].scaled):
                worst[p.layer] = p
        return list(worst.items())


def _layer_of(module: str) -> str:
    found = re.match(r"model\.layers\.(\d+)\.", module + ".")
    if found:
        return found.group(1)
    return "embed" if "embed_tokens" in module else "head"


class _OnnxValues:
    """Finds the ONNX value of each probed module through the weights it consumes."""

    def __init__(self, model: ir.Model, tied: bool):
        self.inits = model.graph.initializers
        self.tied = tied

    def _consumer(self, names: list[str], ops: set[str]) -> ir.Node | None:
        for name in names:
            if name in self.inits:
                for node, _ in self.inits[name].uses():
                    if node.op_type in ops:
                        return node
        return None

    def output(self, name: str, module: nn.Module) -> ir.Value | None:
        if isinstance(module, nn.Embedding):
            node = self._consumer([f"{name}.weight"], {"Gather"})
        elif isinstance(module, RMSNorm):
            node = self._consumer([f"{name}.weight"], _NORM_OPS)
        elif isinstance(module, nn.Linear):
            node = self._linear(name)
            bias = self._consumer([f"{name}.bias"], {"Add"}) if module.bias is not None else None
            node = bias or node
        elif isinstance(module, DecoderLayer):
            return self._residual(name)
        else:
            return None
        return node.outputs[0] if node is not None else None

    def input(self, name: str, module: nn.Module) -> ir.Value | None:
        node = self._linear(name) if isinstance(module, nn.Linear) else None
        return node.inputs[0] if node is not None else None

    def _linear(self, name: str) -> ir.Node | None:
        names = [f"{name}.weight{io.TRANSPOSED}", f"{name}.weight"]
        if name == "lm_head" and self.tied:
            names.append("model.embed_tokens.weight")
        return self._consumer(names, {"MatMul", "Gemm"})

    def _residual(self, layer: str) -> ir.Value | None:
        down = self._linear(f"{layer}.mlp.down_proj")
        for node, _ in (down.outputs[0].uses() if down is not None else []):
            if node.op_type == "Add":
                return node.outputs[0]
            if node.op_type == "SkipSimplifiedLayerNormalization" and len(node.outputs) > 3:
                return node.outputs[3]
        return None


def _hooks(net: nn.Module, records: list):
    """Forward hooks recording (module name, module, first input, first output) in call order."""
    kinds = (nn.Embedding, RMSNorm, nn.Linear, DecoderLayer)

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            records.append((name, module, args[0].detach().float().clone(), out.detach().float().clone()))
        return record

    return [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if isinstance(m, kinds)]


def _judge(label: str, layer: str, got: np.ndarray, ref: np.ndarray, tolerance: float) -> Probe:
    got, ref = got.astype(np.float32).ravel(), ref.ravel()
    finite = np.isfinite(got)
    nonfinite = int((~finite).sum())
    max_ref = float(np.abs(ref).max()) if ref.size else 0.0
    max_onnx = float(np.abs(got).max()) if got.size else 0.0
    diff = np.abs(got - ref)
    scaled = float(diff.max() / max(max_ref, 1e-30)) if got.size else 0.0
    if nonfinite:
        scaled = float("inf")
    return Probe(label, layer, max_ref, max_onnx, scaled, nonfinite, not scaled <= tolerance,
                 nonfinite > 0 or max_onnx > FP16_LIMIT)


def bisect_bundle(bundle_dir, source=None, seed: int = 0, tokens: int = BISECT_TOKENS,
                  threads: int | None = None) -> BisectReport:
    """Compare every probe of one `tokens`-long random prompt; `source` as in verify_bundle."""
    bundle = Bundle.open(bundle_dir)
    tolerance = TOLERANCES[bundle.dtype].caches
    tokens = max(1, min(tokens, bundle.max_seq_len))
    ids = np.random.default_rng(seed).integers(0, bundle.vocab_size, (1, tokens))
    positions = np.arange(tokens)[None, :]
    lengths = np.array([tokens])

    records: list = []
    with TorchBackend(bundle, "cpu", "float32", cache_rows=1, threads=threads, cache_len=tokens,
                      source=source) as reference:
        handles = _hooks(reference.model, records)
        try:
            reference.step(io.PREFILL, ids, positions, lengths, range(1))
        finally:
            for h in handles:
                h.remove()
        tied = reference.model.config.tie_word_embeddings

    model = ir.load(bundle.graph_path(io.PREFILL))
    values = _OnnxValues(model, tied)
    wanted: list[tuple[str, str, ir.Value, np.ndarray]] = []  # (label, layer, onnx value, reference)
    seen: set[str] = set()
    for name, module, x, y in records:
        for label, value, ref in ((f"{name} (input)", values.input(name, module), x),
                                  (name, values.output(name, module), y)):
            if value is None or value.name in seen:
                continue
            seen.add(value.name)
            wanted.append((label, _layer_of(name), value, ref.numpy()))
    outputs = {v.name for v in model.graph.outputs}
    model.graph.outputs.extend(v for _, _, v, _ in wanted if v.name not in outputs)

    session = create_session(bundle, ort_weights(bundle), ir.to_proto(model).SerializeToString(), threads=threads)
    cache = np.zeros(bundle.cache_shape(1), dtype=NUMPY_DTYPES[bundle.dtype])
    feeds = {io.INPUT_IDS: ids, io.POSITION_IDS: positions, io.SEQ_LENS: lengths,
             io.LOGITS_INDEX: io.logits_index(lengths, positions)[:, None]}
    feeds |= {name: cache for name in bundle.kv.inputs}
    if io.TOTAL_SEQ_LEN in {i.name for i in session.get_inputs()}:
        feeds[io.TOTAL_SEQ_LEN] = np.array(int(np.max(lengths)), dtype=np.int32)
    got = session.run([v.name for _, _, v, _ in wanted], feeds)
    probes = []
    for (label, layer, _, ref), out in zip(wanted, got, strict=True):
        if out.size == ref.size:  # the same tensor in another layout would be a different probe
            probes.append(_judge(label, layer, out, ref, tolerance))
    return BisectReport(str(bundle_dir), bundle.dtype, tolerance, tokens, probes)
