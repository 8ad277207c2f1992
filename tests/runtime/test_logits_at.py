"""Every-position logits (`logits_at`): the prefill graph returns the logits at the positions a
step picks, on every target and dtype, quantized included; the default is the last real token."""

from __future__ import annotations

import numpy as np
import pytest

from llmexport import LLMExportError
from llmexport.exporter.quantize import QuantConfig
from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from llmexport.runtime.backends.torch import TorchBackend
from llmexport.runtime.bundle import Bundle

PREFILL, DECODE = "prefill", "decode"
# (family, target, dtype, quant, tolerance relative to the logits' scale)
CASES = [("llama3", "ort", "float32", None, 1e-4), ("qwen2", "ort", "float32", None, 1e-4),
         ("llama3", "portable", "float32", None, 1e-4), ("qwen2", "tensorrt", "float32", None, 1e-4),
         ("qwen2", "ort", "float16", None, 2e-2), ("llama3", "portable", "float16", None, 2e-2),
         ("llama2", "ort", "float32", QuantConfig("int4"), 1e-4),
         ("qwen2", "portable", "float32", QuantConfig("int4", 16), 1e-4)]


def _id(case) -> str:
    family, target, dtype, quant, _ = case
    return f"{family}-{target}-{dtype}" + (f"-{quant.method}" if quant else "")


@pytest.fixture(params=CASES, ids=_id)
def case(request, bundle_factory):
    family, target, dtype, quant, tol = request.param
    extra = {"quant": quant} if quant else {}
    bundle_dir, _ = bundle_factory(family, target, dtype, **extra)
    return Bundle.open(bundle_dir), tol


def _close(got: np.ndarray, want: np.ndarray, tol: float) -> bool:
    return float(np.abs(got - want).max() / np.abs(want).max()) < tol


def _one_token_at_a_time(backend, ids: np.ndarray) -> np.ndarray:
    """(1, S, V): a one-token prefill, then decode steps."""
    out = [backend.step(PREFILL, ids[:, :1], np.zeros((1, 1), np.int64), np.array([1]), range(1))]
    for t in range(1, ids.shape[1]):
        out.append(backend.step(DECODE, ids[:, t: t + 1], np.array([[t]]), np.array([t + 1]), range(1)))
    return np.stack(out, axis=1)


def test_every_position_equals_one_token_at_a_time_and_the_reference(case):
    bundle, tol = case
    ids = np.random.default_rng(0).integers(3, bundle.vocab_size, (1, 12))
    positions, every = np.arange(12)[None], np.arange(12)[None]
    with OnnxRuntimeBackend(bundle, cache_rows=1) as backend:
        whole = backend.step(PREFILL, ids, positions, np.array([12]), range(1), logits_at=every)
        stepped = _one_token_at_a_time(backend, ids)
    assert whole.shape == (1, 12, bundle.vocab_size)
    assert _close(whole, stepped, tol)
    # Unprepacked, quantized products run in float on the exact dequantized weights (prepacked, ONNX
    # Runtime's accuracy level 4 quantizes activations to int8: a quality effect, not plumbing).
    with OnnxRuntimeBackend(bundle, cache_rows=1, prepack=False) as backend:
        whole = backend.step(PREFILL, ids, positions, np.array([12]), range(1), logits_at=every)
    with TorchBackend(bundle, dtype="float32", cache_rows=1) as reference:  # its dequantized weights if quantized
        want = reference.step(PREFILL, ids, positions, np.array([12]), range(1), logits_at=every)
    assert _close(whole, want, tol)


def test_chunks_over_a_filled_cache_give_the_whole_prompts_logits(case):
    """A prompt prefilled in two chunks with every position's logits (what scoring does), and the
    last-token default beside it."""
    bundle, tol = case
    ids = np.random.default_rng(1).integers(3, bundle.vocab_size, (1, 10))
    with OnnxRuntimeBackend(bundle, cache_rows=1) as backend:
        whole = backend.step(PREFILL, ids, np.arange(10)[None], np.array([10]), range(1),
                             logits_at=np.arange(10)[None])
        last = backend.step(PREFILL, ids, np.arange(10)[None], np.array([10]), range(1))
        first = backend.step(PREFILL, ids[:, :6], np.arange(6)[None], np.array([6]), range(1),
                             logits_at=np.arange(6)[None])
        second = backend.step(PREFILL, ids[:, 6:], np.arange(6, 10)[None], np.array([10]), range(1),
                              logits_at=np.array([[3, 0]]))  # any positions, any order
    assert _close(np.concatenate([first, second[:, 1:]], axis=1), whole[:, :7], tol)
    assert _close(second[:, 0], whole[:, 9], tol) and _close(last, whole[:, 9], tol)


def test_a_ragged_batch_picks_per_row(bundle_factory):
    bundle = Bundle.open(bundle_factory("llama3", "ort")[0])
    ids = np.random.default_rng(2).integers(3, bundle.vocab_size, (2, 8))
    lengths = np.array([8, 5])  # row 1 is right-padded after 5 tokens
    with OnnxRuntimeBackend(bundle, cache_rows=2) as backend:
        picked = backend.step(PREFILL, ids, np.tile(np.arange(8), (2, 1)), lengths, range(2),
                              logits_at=np.array([[7, 0], [4, 1]]))
        alone = backend.step(PREFILL, ids[1:, :5], np.arange(5)[None], np.array([5]), range(1),
                             logits_at=np.array([[4, 1]]))
        default = backend.step(PREFILL, ids, np.tile(np.arange(8), (2, 1)), lengths, range(2))
    assert _close(picked[1], alone[0], 1e-4)
    assert _close(picked[:, 0], default, 1e-4)


@pytest.mark.parametrize("phase, at, message", [
    (DECODE, [[0]], "run the step as prefill"),
    (PREFILL, [[0, 4]], "outside this step's 0..3"),
    (PREFILL, [0, 1], r"expected \(batch, K\)"),
])
def test_bad_positions_are_clear_errors(bundle_factory, phase, at, message):
    bundle = Bundle.open(bundle_factory("llama3", "ort")[0])
    s = 4 if phase == PREFILL else 1
    with OnnxRuntimeBackend(bundle, cache_rows=1) as backend, pytest.raises(LLMExportError, match=message):
        backend.step(phase, np.ones((1, s), np.int64), np.arange(s)[None], np.array([s]), range(1),
                     logits_at=np.array(at))


def test_the_device_path_picks_too(bundle_factory):
    """ONNX Runtime's own buffers and one prefill-graph session for both phases (the GPU path, run
    on CPU): every-position logits equal the host path's, and decode still returns (B, vocab)."""
    bundle = Bundle.open(bundle_factory("qwen2", "ort")[0])
    ids = np.random.default_rng(3).integers(3, bundle.vocab_size, (1, 6))
    got = {}
    for device_path in (False, True):
        with OnnxRuntimeBackend(bundle, cache_rows=1, device_path=device_path) as backend:
            every = backend.step(PREFILL, ids, np.arange(6)[None], np.array([6]), range(1),
                                 logits_at=np.arange(6)[None])
            after = backend.step(DECODE, ids[:, :1], np.array([[6]]), np.array([7]), range(1))
        assert after.shape == (1, bundle.vocab_size)
        got[device_path] = every, after
    assert _close(got[True][0], got[False][0], 1e-5) and _close(got[True][1], got[False][1], 1e-5)
