"""Trace the reference model on `meta` into one ONNX graph per phase (no weights touched).

Inputs and outputs are runtime/bundle/kv.py's graph_inputs/graph_outputs. Decode returns
each row's one new token's logits; prefill returns the logits at the positions the caller picks
(`logits_index`: the last real token, or every position for scoring). Both return the updated
caches. Prefill has dynamic batch, sequence and picked positions; decode has sequence fixed to
1, so for a given batch every shape is static (CUDA-graph capturable). The `genai` graph
(`ort` bundles) is onnxruntime-genai's contract: ids and an attention mask in, the last real
token's logits out, caches of any length up to max_seq_len (genai sizes them by max_length).
"""

from __future__ import annotations

import warnings

import onnx_ir as ir
import torch
from torch import Tensor, nn
from torch.export import Dim

from llmexport import LLMExportError
from llmexport.model.config import ModelConfig
from llmexport.model.llama import LlamaModel
from llmexport.model.weights import TORCH_DTYPES
from llmexport.runtime.bundle import kv
from llmexport.runtime.bundle import names as io

from . import layers
from .targets import translation_table

OPSET = 21
_PREFIX = "net."


class _Decode(nn.Module):
    """Flat tensors in, flat tensors out: what the graph's signature is."""

    def __init__(self, net: LlamaModel):
        super().__init__()
        self.net = net

    def forward(self, input_ids: Tensor, position_ids: Tensor, seq_lens: Tensor, *caches: Tensor):
        last = io.logits_index(seq_lens, position_ids)  # (B,) the one token of this step
        return self.run(input_ids, position_ids, seq_lens, caches, last)

    def run(self, input_ids, position_ids, seq_lens, caches, logits_index):
        logits, k, v = self.net(input_ids, position_ids, seq_lens, *kv.split(caches), logits_index)
        return (logits, *kv.interleave(k, v))


class _Prefill(_Decode):
    def forward(self, input_ids: Tensor, position_ids: Tensor, seq_lens: Tensor, logits_index: Tensor,
                *caches: Tensor):
        return self.run(input_ids, position_ids, seq_lens, caches, logits_index)  # logits (B, K, V)


class _Genai(_Decode):
    """onnxruntime-genai's decoder contract over the same model: one graph for the first prompt
    (right-padded, S == the mask's width), later chunks (batch 1) and decode steps (S == 1),
    returning each row's last real token's logits (B, 1, V), the shape genai takes as already
    picked. The mask gives what the other graphs are fed: seq_lens (its row sums) and the
    positions (0.. for a first prompt, else after the tokens already held)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *caches: Tensor):
        seq_lens = attention_mask.sum(-1)  # (B,)
        start = (seq_lens - input_ids.shape[1]).clamp(min=0)  # (B,) the position of this step's first token
        position_ids = start[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)  # (B, S)
        last = io.logits_index(seq_lens, position_ids)[:, None]  # (B, 1)
        return self.run(input_ids, position_ids, seq_lens, caches, last)


_MODULES = {io.PREFILL: _Prefill, io.DECODE: _Decode, io.GENAI: _Genai}


def trace(config: ModelConfig, dtype: str, max_seq_len: int, max_batch: int, phase: str, target: str) -> ir.Model:
    """The graph for `phase` with initializers named like the checkpoint (+ rope tables): one
    layer of each kind traced and repeated (exporter/layers.py), or every layer traced when the
    traced graph does not allow that."""
    small, kind_of = layers.kinds(config)
    if small.num_layers < config.num_layers:
        model = layers.repeat_layers(_trace(small, dtype, max_seq_len, max_batch, phase, target), small, kind_of)
        if model is not None:
            _check_signature(model, config, phase)
            return model
    return _trace(config, dtype, max_seq_len, max_batch, phase, target)


def _trace(config: ModelConfig, dtype: str, max_seq_len: int, max_batch: int, phase: str, target: str) -> ir.Model:
    with torch.device("meta"):
        net = LlamaModel(config, max_seq_len).to(TORCH_DTYPES[dtype]).eval()
    # Examples of size >= 2 on every dynamic axis: a size-1 example gets specialised to 1.
    batch, seq = 2, (1 if phase == io.DECODE else 2)
    args, dynamic = _token_inputs(phase, batch, seq, max_batch, max_seq_len)
    layout = kv.KVLayout.of(config, max_seq_len)
    caches = tuple(torch.zeros(layout.shape(batch), device="meta", dtype=TORCH_DTYPES[dtype])
                   for _ in range(layout.buffers))
    cache_dims = {0: dynamic["input_ids"][0]}
    if phase == io.GENAI:  # genai allocates search.max_length slots (at most max_seq_len: the rope tables' rows)
        cache_dims[2] = Dim(io.MAX_LENGTH, min=2, max=max_seq_len)
    dynamic["caches"] = tuple(cache_dims for _ in caches)
    module = _MODULES[phase](net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args + caches, dynamo=True, optimize=False, verbose=False, opset_version=OPSET,
            dynamic_shapes=dynamic, input_names=kv.graph_inputs(config.num_layers, phase),
            output_names=kv.graph_outputs(config.num_layers),
            custom_translation_table=translation_table(target, config),
        )
    model = program.model
    _rename_initializers(model, config)
    if phase == io.PREFILL:
        _name_dim(model, model.graph.inputs[3].shape[1], io.PICKED)
    _check_signature(model, config, phase)
    return model


def _token_inputs(phase: str, batch: int, seq: int, max_batch: int, max_seq_len: int) -> tuple[tuple, dict]:
    """Example token inputs of `phase` (meta tensors) and their dynamic dims, by argument name."""
    meta = dict(device="meta", dtype=torch.long)
    b = Dim(io.BATCH, min=1, max=max(max_batch, 2))
    token_dims = {0: b} if phase == io.DECODE else {0: b, 1: Dim(io.SEQUENCE, min=1, max=max_seq_len)}
    ids = torch.zeros(batch, seq, **meta)
    if phase == io.GENAI:  # the mask's width != S in the example, so neither is specialised to the other
        mask = torch.zeros(batch, seq + 1, **meta)
        return (ids, mask), {"input_ids": token_dims,
                             "attention_mask": {0: b, 1: Dim(io.TOTAL_LENGTH, min=1, max=max_seq_len)}}
    args = (ids, torch.zeros(batch, seq, **meta), torch.zeros(batch, **meta))
    dynamic = {"input_ids": token_dims, "position_ids": token_dims, "seq_lens": {0: b}}
    if phase == io.PREFILL:
        args += (torch.zeros(batch, 3, **meta),)  # logits_index (B, K); K != S so neither is specialised to the other
        dynamic["logits_index"] = {0: b, 1: Dim(io.PICKED, min=1, max=max_seq_len)}
    return args, dynamic


def _name_dim(model: ir.Model, dim, name: str) -> None:
    """torch.onnx names this Dim after its own symbol (s89, ...): give it the manifest's name."""
    values = [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        if value.shape is not None and dim in value.shape:
            value.shape = ir.Shape([name if d == dim else d for d in value.shape])


def _rename_initializers(model: ir.Model, config: ModelConfig) -> None:
    """Checkpoint names; with tied embeddings the trace keeps one tensor under either name."""
    fixed = {"rope_cos": io.ROPE_COS, "rope_sin": io.ROPE_SIN}
    if config.tie_word_embeddings:
        fixed["lm_head.weight"] = "model.embed_tokens.weight"
    for value in list(model.graph.initializers.values()):
        name = value.name.removeprefix(_PREFIX)
        value.name = fixed.get(name, name)
    renamed = {v.name: v for v in model.graph.initializers.values()}
    model.graph.initializers.clear()
    model.graph.initializers.update(renamed)


def _check_signature(model: ir.Model, config: ModelConfig, phase: str) -> None:
    """The traced graph must have exactly the I/O names and dynamic dims the manifest promises."""
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    if inputs != kv.graph_inputs(config.num_layers, phase) or outputs != kv.graph_outputs(config.num_layers):
        raise LLMExportError(f"internal: traced {phase} graph has unexpected I/O {inputs} -> {outputs}")
    ids = model.graph.inputs[0].shape
    want_seq = 1 if phase == io.DECODE else io.SEQUENCE
    if str(ids[0]) != io.BATCH or str(ids[1]) != str(want_seq):
        raise LLMExportError(f"internal: {phase} input_ids traced as {ids}, expected [{io.BATCH}, {want_seq}]")
    want_logits = {io.DECODE: [io.BATCH, config.vocab_size], io.PREFILL: [io.BATCH, io.PICKED, config.vocab_size],
                   io.GENAI: [io.BATCH, 1, config.vocab_size]}[phase]
    logits = [d if isinstance(d, int) else str(d) for d in model.graph.outputs[0].shape]
    if logits != want_logits:
        raise LLMExportError(f"internal: {phase} logits traced as {logits}, expected {want_logits}")
