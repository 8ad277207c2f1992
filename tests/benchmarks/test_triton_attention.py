"""The flash-decoding Triton kernel against the reference attention math, run by Triton's CPU
interpreter (correctness only; timing needs a GPU). Caches are poisoned with NaN past each
sequence's length and the output buffer starts as NaN: every output must be written, and
nothing past a valid length may be read."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton; it is in .[test])")

CHECK = r"""
import sys
import torch
from llmexport.benchmarks.triton_attention import decode_attention

batch, hq, hkv, d, t, window, dtype, chunk = sys.argv[1:]
batch, hq, hkv, d, t, window, chunk = map(int, (batch, hq, hkv, d, t, window, chunk))
dtype = getattr(torch, dtype)
torch.manual_seed(0)
q = torch.randn(batch, hq, d, dtype=dtype)
k, v = torch.randn(batch, hkv, t, d, dtype=dtype), torch.randn(batch, hkv, t, d, dtype=dtype)
lens = torch.tensor([t, 1, 7, t // 2 + 1][:batch])  # full, one token, odd lengths

# Reference: model/attention.py's masking for the decode query at position len - 1, in float32.
g = hq // hkv
scores = torch.einsum("bhd,bhtd->bht", q.float(), k.repeat_interleave(g, 1).float()) * d ** -0.5
j, p = torch.arange(t), (lens - 1)[:, None]
visible = (j <= p) & ((p - j < window) if window else True)
probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
want = torch.einsum("bht,bhtd->bhd", probs, v.repeat_interleave(g, 1).float())

for b in range(batch):  # poison everything past the valid length
    k[b, :, lens[b]:] = float("nan")
    v[b, :, lens[b]:] = float("nan")
out = torch.full_like(q, float("nan"))
decode_attention(q, k, v, lens.to(torch.int32), d ** -0.5, window, out=out, chunk=chunk, block_n=16)
assert torch.isfinite(out).all(), "read past a valid length, or left outputs unwritten"
err = (out.float() - want).abs().max().item()
rel = err / want.abs().max().item()
print(f"{err:.3g} {rel:.3g}")
"""

CASES = [  # batch, hq, hkv, head_dim, T, window, dtype, chunk
    (2, 4, 2, 16, 64, 0, "float32", 32),       # tiny GQA, two chunks
    (3, 4, 4, 16, 70, 8, "float32", 16),       # sliding window, odd capacity, five chunks
    (4, 32, 32, 128, 96, 0, "float16", 32),    # llama-2-7b heads
    (4, 32, 8, 128, 96, 0, "float16", 64),     # llama-3-8b heads (GQA 4)
    (2, 14, 2, 64, 130, 0, "float16", 64),     # qwen2-0.5b heads (GQA 7: padded to 16 rows)
]
# Relative to max |reference|. No bfloat16 case: the interpreter's tl.dot is wrong for bf16
# (a 16x16 product off by 2e10 while bf16 loads are exact), so bf16 is checked on a GPU only.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


def _interpret(script: str, case: tuple, dtype: str) -> None:
    """Run a check in a fresh interpreter-mode process (TRITON_INTERPRET must be set before
    Triton compiles anything) and hold its relative error to the dtype's tolerance."""
    out = subprocess.run([sys.executable, "-c", script, *map(str, case)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    _, relative = map(float, out.stdout.split())
    assert relative < TOLERANCE[dtype], out.stdout


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-t{c[4]}-w{c[5]}-{c[6]}")
def test_decode_kernel_matches_the_reference(case):
    _interpret(CHECK, case, case[6])


PREFILL_CHECK = r"""
import sys
import torch
from llmexport.benchmarks.triton_attention import prefill_attention

batch, seq, hq, hkv, d, t, window, dtype = sys.argv[1:]
batch, seq, hq, hkv, d, t, window = map(int, (batch, seq, hq, hkv, d, t, window))
dtype = getattr(torch, dtype)
torch.manual_seed(0)
q = torch.randn(batch, seq, hq, d, dtype=dtype)
k, v = torch.randn(batch, hkv, t, d, dtype=dtype), torch.randn(batch, hkv, t, d, dtype=dtype)
positions = torch.tensor([0, 5, 11][:batch])[:, None] + torch.arange(seq)  # fresh and continued prompts

g = hq // hkv
scores = torch.einsum("bshd,bhtd->bhst", q.float(), k.repeat_interleave(g, 1).float()) * d ** -0.5
j, p = torch.arange(t), positions[:, :, None]
visible = (j <= p) & ((p - j < window) if window else True)
probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
want = torch.einsum("bhst,bhtd->bshd", probs, v.repeat_interleave(g, 1).float())

for b in range(batch):  # poison everything past each sequence's last position
    k[b, :, int(positions[b].max()) + 1:] = float("nan")
    v[b, :, int(positions[b].max()) + 1:] = float("nan")
out = torch.full_like(q, float("nan"))
prefill_attention(q, k, v, positions.to(torch.int32), d ** -0.5, window, out=out, block_m=8, block_n=16)
assert torch.isfinite(out).all(), "read past a position, or left outputs unwritten"
err = (out.float() - want).abs().max().item()
print(f"{err:.3g} {err / want.abs().max().item():.3g}")
"""

PREFILL_CASES = [  # batch, new tokens, hq, hkv, head_dim, T, window, dtype
    (2, 9, 4, 2, 16, 40, 0, "float32"),
    (3, 20, 4, 4, 16, 64, 6, "float32"),     # sliding window narrower than the prompt
    (2, 17, 8, 2, 32, 48, 0, "float16"),
    (1, 24, 32, 8, 128, 64, 0, "float16"),   # llama-3-8b heads
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"b{c[0]}-s{c[1]}-h{c[2]}/{c[3]}-w{c[6]}-{c[7]}")
def test_prefill_kernel_matches_the_reference(case):
    _interpret(PREFILL_CHECK, case, case[7])


def test_what_the_kernels_assume_is_checked_and_float32_stays_ieee():
    """A head_dim that is not a power of two (tl.arange) and a non-unit last stride are clear
    errors before any launch; float32 operands ask tl.dot for IEEE precision (its default on
    tensor-core GPUs is TF32, which the 1e-5 tolerance above would not survive on a GPU)."""
    import torch

    from llmexport import LLMExportError
    from llmexport.benchmarks import triton_attention as ta

    q, k = torch.zeros(1, 4, 80), torch.zeros(1, 2, 8, 80)
    with pytest.raises(LLMExportError, match="power-of-two head_dim >= 16, not 80"):
        ta.decode_attention(q, k, k, torch.ones(1, dtype=torch.int32), 0.1)
    q, k = torch.zeros(1, 4, 32), torch.zeros(1, 2, 32, 8).transpose(2, 3)  # head_dim axis strided
    with pytest.raises(LLMExportError, match="k_cache must be contiguous in its last"):
        ta.decode_attention(q, k, k.contiguous(), torch.ones(1, dtype=torch.int32), 0.1)
    q = torch.zeros(1, 3, 4, 32)
    with pytest.raises(LLMExportError, match="out must have q's strides"):
        cache = torch.zeros(1, 2, 8, 32)
        ta.prefill_attention(q, cache, cache, torch.zeros(1, 3, dtype=torch.int32), 0.1,
                             out=torch.zeros(1, 4, 3, 32).transpose(1, 2))
    assert ta._precision(torch.zeros(1)) == "ieee" and ta._precision(torch.zeros(1).half()) == "tf32"
