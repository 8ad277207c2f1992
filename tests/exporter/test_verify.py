"""verify's judgement: relative to each output's scale, NaN/Inf always fails, tolerances finite."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from llmexport.exporter.verify import TOLERANCES, _Stats, verify_bundle


def test_every_dtype_has_finite_tolerances():
    for tol in TOLERANCES.values():
        assert all(math.isfinite(v) and v > 0 for v in (tol.logits, tol.caches, tol.min_top1))


def test_error_is_judged_relative_to_the_outputs_scale():
    ref = np.random.default_rng(0).normal(size=(2, 100)).astype(np.float32) * 1000
    stats = _Stats("logits", True, TOLERANCES["float32"])
    stats.add(ref + 0.01, ref)  # 0.01 absolute on values of ~3000: 3e-6 relative
    result = stats.result()
    assert result.ok and result.max_abs > 1e-4 and result.max_scaled < 1e-5


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_values_fail_even_when_both_sides_agree(poison):
    ref = np.ones((2, 8), np.float32)
    ref[0, 3] = poison
    stats = _Stats("present", False, TOLERANCES["float32"])
    stats.add(ref.copy(), ref)
    result = stats.result()
    assert not result.ok and result.nonfinite == 1 and result.max_scaled == math.inf


def test_an_all_nan_output_is_not_reported_as_zero_error():
    stats = _Stats("logits", True, TOLERANCES["float32"])
    stats.add(np.full((2, 8), np.nan, np.float32), np.ones((2, 8), np.float32))
    assert not stats.result().ok


def test_a_nan_weight_fails_verify(bundle_factory, tmp_path):
    bundle, _ = bundle_factory("llama2", "ort")
    bad = shutil.copytree(bundle, tmp_path / "bad")
    entry = json.loads((bad / "manifest.json").read_text())["weights"]["tensors"]["model.layers.1.mlp.up_proj.weight.T"]
    weights = np.memmap(bad / "weights.bin", dtype=np.float32, mode="r+", offset=entry["offset"], shape=(4,))
    weights[:] = np.nan
    weights.flush()
    report = verify_bundle(bad, prompts=2, decode_steps=2)
    logits = [r for r in report.rows if r.output.startswith("logits")]
    assert not report.ok and logits and all(r.nonfinite > 0 and not r.ok for r in logits)


@pytest.mark.parametrize("seed", range(3))
def test_good_bundles_pass_whatever_the_seed(bundle_factory, seed):
    for dtype in ("float32", "float16"):
        bundle, _ = bundle_factory("qwen2", "ort", dtype)
        assert verify_bundle(bundle, prompts=4, decode_steps=4, seed=seed).ok
