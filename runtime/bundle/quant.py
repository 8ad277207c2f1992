"""Block-wise weight-only quantization: the packed layout a bundle stores, packing and unpacking.

A linear weight W of shape [N, K] (out, in: the checkpoint's layout) is cut along K into
blocks of `block_size` values; each block of each row has one scale and, asymmetric, one
offset. Stored as ONNX Runtime's MatMulNBits takes it (with its default zero point):

    codes    uint8 [N, K / block_size, block_size * bits / 8]  unsigned codes, packed low
             nibble first along K when bits == 4
    scales   bundle dtype [N, K / block_size]
    offsets  bundle dtype [K / block_size, N], asymmetric only (transposed: the right side of
             the small MatMul that adds them, so no runtime transposes them per step)

    W[n, k] = (code[n, k] - 2^(bits-1)) * scale[n, b] + offset[b, n],   b = k / block_size

The `portable` and `tensorrt` targets use layout "DequantizeLinear" instead: the weight
transposed, as the MatMul reads it, and the codes signed (TensorRT's dequantize accepts only
zero zero-points), so blocked DequantizeLinear (opset 21, axis 0) feeds MatMul directly:

    codes    int4/int8 [K, N] two's complement code - 2^(bits-1) (the unsigned code with its top
             bit flipped); int4 packed two per byte along N, low nibble first (ONNX's packing)
    scales, offsets  bundle dtype [K / block_size, N]

    W[n, k] = code[k, n] * scale[b, n] + offset[b, n]

Symmetric blocks (no offset) put the block's largest magnitude on the code 0 (llama.cpp's
q4_0/q8_0 rule: scale = that signed value / -2^(bits-1)), so all 2^bits codes are used and
that value is exact. Asymmetric blocks map [min, max] onto [0, 2^bits - 1] exactly: scale =
(max - min) / (2^bits - 1), offset = min + 2^(bits-1) * scale (llama.cpp's q4_1 grid). The
offset is a float, not an integer zero point: an integer zero point forces a code onto 0.0,
which costs up to half a step of the grid in every block (see README for the measurement).
Codes are chosen against the stored (rounded) scale and offset. numpy only: the exporter
packs with it and every reader (the torch reference, C hosts following README) unpacks the
same way.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError

BITS = {"int8": 8, "int4": 4}
MATMULNBITS, DEQUANTIZE = "MatMulNBits", "DequantizeLinear"  # the two layouts (module docstring)
LAYOUTS = (MATMULNBITS, DEQUANTIZE)
MIN_BLOCK = 16  # MatMulNBits' smallest block


@dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int
    symmetric: bool = True
    layout: str = MATMULNBITS

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric, "layout": self.layout}

    @classmethod
    def from_dict(cls, record: dict) -> "Scheme":
        """The scheme of a quantized weight's manifest record (which holds to_dict()'s fields)."""
        return cls(record["bits"], record["block_size"], record["symmetric"], record["layout"])


# A quantized weight's stored tensors, by role ("rows": the codes' bytes seen as a 2-D table).
ROLES = ("codes", "scales", "offsets", "rows")


def stored_tensors(record: dict) -> list[str]:
    """weights.bin names of one quantized weight's record (its roles that are present)."""
    return [record[role] for role in ROLES if record.get(role)]


def check_block(block_size: int, k: int, name: str) -> None:
    """MatMulNBits needs a power-of-two block of at least 16 that divides the row."""
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        raise LLMExportError(f"--quant-block {block_size} must be a power of two >= {MIN_BLOCK} (e.g. 32, 64, 128)")
    if block_size > k or k % block_size:
        raise LLMExportError(f"--quant-block {block_size} does not divide the {k} inputs of {name}; choose a "
                             f"power of two that divides {k}")


CHUNK_ELEMENTS = 1 << 20  # rows are packed this many weights at a time: temporaries stay in cache


def pack(w: np.ndarray, scheme: Scheme, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, offsets or None) of a float [N, K] weight."""
    n, k = w.shape
    blocks = k // scheme.block_size
    codes = np.empty((n, blocks, scheme.block_size), np.uint8)
    scale = np.empty((n, blocks), scale_dtype)
    offset = None if scheme.symmetric else np.empty((n, blocks), scale_dtype)
    step = max(1, CHUNK_ELEMENTS // k)

    def rows(start: int) -> None:
        part = slice(start, start + step)
        chunk = np.asarray(w[part], np.float32).reshape(-1, blocks, scheme.block_size)
        codes[part], scale[part], chunk_offset = _quantize(chunk, scheme, scale_dtype)
        if offset is not None:
            offset[part] = chunk_offset

    starts = range(0, n, step)
    if len(starts) == 1:
        rows(0)
    else:  # numpy's ufuncs release the GIL: chunks run on every core
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(rows, starts))
    if offset is not None:
        offset = offset.T.copy()  # stored [K/block, N]: the right side of the MatMul that adds them
    half = 2 ** (scheme.bits - 1)
    if scheme.layout == DEQUANTIZE:  # signed [K, N]: two's complement of code - half is the top bit flipped
        codes = np.ascontiguousarray((codes ^ np.uint8(half)).reshape(n, k).T)
        scale = scale.T.copy()
    return (_pack_nibbles(codes) if scheme.bits == 4 else codes), scale, offset


def _quantize(blocks: np.ndarray, scheme: Scheme, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unsigned codes, scales and offsets (None: symmetric) of float32 [rows, K/block, block]."""
    levels, half = 2**scheme.bits - 1, 2 ** (scheme.bits - 1)
    if scheme.symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale, offset = (extreme / -half).astype(scale_dtype), None
        base = np.zeros(scale.shape, np.float32)
    else:
        lo, hi = blocks.min(-1), blocks.max(-1)
        scale = ((hi - lo) / levels).astype(scale_dtype)  # rounded first: codes fit the stored values
        offset = (lo + half * scale.astype(np.float32)).astype(scale_dtype)
        base = offset.astype(np.float32)
    inverse = (1 / np.where(scale != 0, scale, 1).astype(np.float32))[..., None]
    values = np.subtract(blocks, base[..., None])
    values *= inverse
    values += half
    np.rint(values, out=values)  # half to even; + half first is the same: half is an integer
    np.clip(values, 0, levels, out=values)
    return values.astype(np.uint8), scale, offset


def unpack(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, scheme: Scheme,
           shape: tuple[int, int]) -> np.ndarray:
    """The float32 [N, K] weight the packed tensors stand for."""
    n, k = shape
    blocks = k // scheme.block_size
    if scheme.layout == DEQUANTIZE:  # back to the MatMulNBits orientation and unsigned codes
        q = _unpack_nibbles(codes, n) if scheme.bits == 4 else codes
        q = (q ^ np.uint8(2 ** (scheme.bits - 1))).T
        scales = scales.T
    else:
        q = _unpack_nibbles(codes, scheme.block_size) if scheme.bits == 4 else codes
    w = (q.reshape(n, blocks, scheme.block_size).astype(np.float32) - 2 ** (scheme.bits - 1)) \
        * scales.astype(np.float32).reshape(n, blocks)[..., None]
    if offsets is not None:  # stored [K/block, N] in both layouts
        w += offsets.astype(np.float32).T.reshape(n, blocks)[..., None]
    return w.reshape(n, k)


def shapes(n: int, k: int, scheme: Scheme) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors of an [N, K] weight, by role."""
    blocks = k // scheme.block_size
    if scheme.layout == DEQUANTIZE:
        out = {"codes": (k, n * scheme.bits // 8), "scales": (blocks, n)}
    else:
        out = {"codes": (n, blocks, scheme.block_size * scheme.bits // 8), "scales": (n, blocks)}
    if not scheme.symmetric:
        out["offsets"] = (blocks, n)
    return out


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into one byte each, the first of a pair in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]
