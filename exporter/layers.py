"""Trace one decoder layer per distinct kind, then repeat it: export time independent of depth.

torch.onnx spends about 1.6 s per layer and phase tracing and decomposing graphs whose layers
are all the same computation (SmolLM2's 30 layers: 49 s of a 62 s export). So the model is
traced with one layer of each kind (a kind is a layer's attention window: full, or sliding
for Mistral/Qwen2 layers), and the real graph is built by cloning the traced layer's nodes
once per real layer: `model.layers.{j}.*` weights become `model.layers.{i}.*`, cache inputs
and outputs get layer i's names, and each clone reads the previous clone's hidden state.

A layer's nodes are those torch.onnx scoped to `net.model.layers.{j}` (its `namespace`
metadata), less Constant nodes (the exporter shares constants between layers). The clone is
refused, and the caller traces every layer instead, when the traced graph does not have the
expected shape: a layer handing anything but one hidden state to what follows, or reading
anything computed by another layer.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from llmexport.model.config import ModelConfig
from llmexport.runtime.bundle import kv
from llmexport.runtime.bundle import names as io

_SCOPE = re.compile(r"/net\.model\.layers\.(\d+): ")
_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.")


def kinds(config: ModelConfig) -> tuple[ModelConfig, list[int]]:
    """(config with one layer per distinct kind, traced layer of each real layer)."""
    windows = list(dict.fromkeys(config.layer_window(i) for i in range(config.num_layers)))
    small = dataclasses.replace(config, num_layers=len(windows),
                                sliding_window_layers=tuple(j for j, w in enumerate(windows) if w))
    return small, [windows.index(config.layer_window(i)) for i in range(config.num_layers)]


class _Unexpected(Exception):
    """The traced graph is not layers in sequence; the caller traces the full model instead."""


def _layer(node: ir.Node) -> int | None:
    if node.op_type == "Constant" and not node.inputs:
        return None  # shared between layers by the exporter
    found = _SCOPE.search(node.metadata_props.get("namespace", ""))
    return int(found.group(1)) if found else None


def repeat_layers(traced: ir.Model, small: ModelConfig, kind_of: list[int]) -> ir.Model | None:
    """The traced model of `small` with its layers cloned into len(kind_of) layers, or None
    when the graph does not have the expected shape (see the module docstring)."""
    try:
        return _repeat(traced, small, kind_of)
    except (_Unexpected, KeyError):
        return None


def _repeat(traced: ir.Model, small: ModelConfig, kind_of: list[int]) -> ir.Model:
    graph = traced.graph
    nodes = list(graph)
    owner = {v: _layer(n) for n in nodes for v in n.outputs}
    layer_nodes = {j: [n for n in nodes if _layer(n) == j] for j in range(small.num_layers)}
    if any(not ns for ns in layer_nodes.values()):
        raise _Unexpected
    present = set(kv.cache_outputs(small.num_layers))

    # Each traced layer: the one value it hands on (its hidden state), and what it reads.
    hidden_out = {}
    for j, ns in layer_nodes.items():
        handed = {v for n in nodes if _layer(n) != j for v in n.inputs if v is not None and owner.get(v) == j}
        handed |= {v for v in graph.outputs if owner.get(v) == j and v.name not in present}
        if len(handed) != 1:
            raise _Unexpected
        hidden_out[j] = handed.pop()
    hidden_in = {}
    for j, ns in layer_nodes.items():
        inside = {v for n in ns for v in n.outputs}
        read = {v for n in ns for v in n.inputs if v is not None and v not in inside}
        from_layers = {v for v in read if owner.get(v) is not None}
        if j == 0:
            if from_layers:
                raise _Unexpected
            # Layer 0 reads the embedding: the one value from outside the layers that the norm
            # after the last layer does not read instead of the hidden state.
            embedded = [v for v in read if v.producer() is not None and v.producer().op_type == "Gather"
                        and "model.embed_tokens.weight" in {i.name for i in v.producer().inputs if i}]
            if len(embedded) != 1:
                raise _Unexpected
            hidden_in[j] = embedded[0]
        else:
            if from_layers != {hidden_out[j - 1]}:
                raise _Unexpected
            hidden_in[j] = hidden_out[j - 1]
    if any(owner.get(v) is not None for n in nodes if _layer(n) is None for v in n.inputs
           if v is not None and v is not hidden_out[small.num_layers - 1]):
        raise _Unexpected

    builder = _Builder(graph)
    first = min(nodes.index(ns[0]) for ns in layer_nodes.values())
    # Shared nodes that the layers may read come first; those after the layers read their output.
    after = set()
    for n in nodes:
        if _layer(n) is None and any(v is not None and (owner.get(v) is not None or v.producer() in after)
                                     for v in n.inputs):
            after.add(n)
    for n in nodes:
        if _layer(n) is None and n not in after:
            builder.clone(n, {}, "")
    if any(nodes.index(n) < first for n in after):
        raise _Unexpected
    hidden = builder.value(hidden_in[0])
    num_layers = len(kind_of)
    for i, j in enumerate(kind_of):
        renames = {hidden_in[j]: hidden}
        for n in layer_nodes[j]:
            builder.clone(n, renames, f"l{i}.", layer=(j, i))
        hidden = renames[hidden_out[j]]
    builder.map[hidden_out[small.num_layers - 1]] = hidden
    for n in nodes:
        if n in after:
            builder.clone(n, {}, "")

    traced_caches = kv.cache_inputs(small.num_layers)
    tokens = [v.name for v in graph.inputs if v.name not in traced_caches]  # the phase's own, kept as traced
    inputs = [builder.graph_input(name) for name in [*tokens, *kv.cache_inputs(num_layers)]]
    outputs = [builder.map[graph.outputs[0]]]
    for i, j in enumerate(kind_of):
        for ours, theirs in zip((io.present_key(i), io.present_value(i)), (io.present_key(j), io.present_value(j))):
            value = builder.layer_outputs[(i, theirs)]
            value.name = ours
            outputs.append(value)
    built = ir.Graph(inputs, outputs, nodes=builder.nodes, initializers=list(builder.initializers.values()),
                     opset_imports=dict(graph.opset_imports), name=graph.name)
    return ir.Model(built, ir_version=traced.ir_version, producer_name=traced.producer_name,
                    producer_version=traced.producer_version, functions=list(traced.functions.values()))


class _Builder:
    """Clones nodes of `graph` into a new node list, mapping old values to new ones."""

    def __init__(self, graph: ir.Graph):
        self.old = graph
        self.map: dict[ir.Value, ir.Value] = {}
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self.inputs: dict[str, ir.Value] = {}
        self.layer_outputs: dict[tuple[int, str], ir.Value] = {}
        self._old_inputs = {v.name: v for v in graph.inputs}

    def graph_input(self, name: str) -> ir.Value:
        if name not in self.inputs:
            template = self._old_inputs[re.sub(r"\.\d+\.", ".0.", name) if name not in self._old_inputs else name]
            self.inputs[name] = ir.Value(name=name, shape=template.shape, type=template.type)
        return self.inputs[name]

    def value(self, old: ir.Value, renames: dict | None = None, layer: tuple[int, int] | None = None) -> ir.Value:
        if renames and old in renames:
            return renames[old]
        if old.is_graph_input():
            name = old.name
            if layer is not None and name in kv.cache_inputs(layer[0] + 1):
                name = name.replace(f".{layer[0]}.", f".{layer[1]}.")
            return self.graph_input(name)
        if old.is_initializer():
            name = old.name
            found = _LAYER_WEIGHT.match(name)
            if found and layer is not None:
                name = f"model.layers.{layer[1]}." + name[found.end():]
            if name not in self.initializers:
                self.initializers[name] = ir.Value(name=name, shape=old.shape, type=old.type,
                                                   const_value=old.const_value)
            return self.initializers[name]
        if old not in self.map:
            raise _Unexpected  # read before it was produced: not in topological order
        return self.map[old]

    def clone(self, node: ir.Node, renames: dict, prefix: str, layer: tuple[int, int] | None = None) -> None:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise _Unexpected  # subgraphs would need a deep copy
        inputs = [None if v is None else self.value(v, renames, layer) for v in node.inputs]
        attributes = [ir.Attr(a.name, a.type, a.value, ref_attr_name=a.ref_attr_name)
                      for a in node.attributes.values()]
        new = ir.Node(node.domain, node.op_type, inputs, attributes, overload=node.overload,
                      num_outputs=len(node.outputs), version=node.version, name=prefix + (node.name or ""),
                      metadata_props=dict(node.metadata_props))
        for old, out in zip(node.outputs, new.outputs, strict=True):
            out.name = prefix + old.name if old.name else None
            out.type = old.type
            out.shape = None if old.shape is None else ir.Shape(list(old.shape))
            if layer is not None:
                renames[old] = out
                self.layer_outputs[(layer[1], old.name)] = out
            else:
                self.map[old] = out
        self.nodes.append(new)
