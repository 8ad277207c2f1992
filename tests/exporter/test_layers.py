"""Tracing one layer per kind and repeating it builds the same graph as tracing every layer."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from llmexport.exporter import layers, trace
from llmexport.exporter.export import _quiet, export_bundle
from llmexport.model.presets import get_preset
from llmexport.model.weights import ModelSource
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

# Layers 2 and 3 use a sliding window, 0, 1 and 4 do not: two kinds, interleaved on purpose.
MIXED = dataclasses.replace(get_preset("tiny-qwen2"), num_layers=5, sliding_window=8, sliding_window_layers=(2, 3))
ATTENTION = {"GroupQueryAttention", "LlmexportAttention"}


def test_kinds_are_the_distinct_attention_windows_in_order():
    small, kind_of = layers.kinds(MIXED)
    assert (small.num_layers, small.sliding_window_layers, kind_of) == (2, (1,), [0, 0, 1, 1, 0])
    small, kind_of = layers.kinds(get_preset("tiny-mistral"))  # every layer windowed: one kind
    assert small.num_layers == 1 and kind_of == [0] * get_preset("tiny-mistral").num_layers


def _summary(model):
    nodes = [n for n in model.graph if n.op_type != "Constant"]  # the full trace repeats constants per layer
    attention = [(n.op_type, sorted((a.name, str(a.value)) for a in n.attributes.values()))
                 for n in nodes if n.op_type in ATTENTION]
    return {
        "ops": collections.Counter((n.domain, n.op_type) for n in nodes),
        "attention, in layer order": attention,
        "weights": sorted((name, str(v.shape), str(v.dtype)) for name, v in model.graph.initializers.items()),
        "io": [(v.name, str(v.shape), str(v.dtype)) for v in (*model.graph.inputs, *model.graph.outputs)],
    }


@pytest.mark.parametrize("target", ["ort", "portable", "tensorrt"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_repeated_layers_equal_the_full_trace(target, phase):
    args = (MIXED, "float32", 64, 4, phase, target)
    repeated = _quiet(trace.trace, *args)
    full = _quiet(trace._trace, *args)
    assert len([n for n in repeated.graph if n.op_type in ATTENTION]) == MIXED.num_layers
    assert _summary(repeated) == _summary(full)


def test_mixed_kinds_run_like_the_reference(tmp_path):
    """Numbers, not only structure: the repeated graph of the mixed model against the torch
    reference, past the window (8) so the windowed layers differ from full attention."""
    source = ModelSource("mixed", MIXED, None, 0)
    bundle = export_bundle(source, tmp_path / "mixed", max_seq_len=64, max_batch=1)
    ids = np.random.default_rng(0).integers(3, MIXED.vocab_size, 20).tolist()
    with Session(bundle, backend="onnxruntime") as ort_side, Session(bundle, backend="torch") as reference:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        got = ort_side.generate([ids], params).token_ids
        want = reference.generate([ids], params).token_ids
    assert got == want and len(got[0]) == 12
