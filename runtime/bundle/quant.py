"""Block-wise weight-only quantization: the packed layout a bundle stores, packing and unpacking.

A linear weight W of shape [N, K] (out, in: the checkpoint's layout) is cut along K into
blocks of `block_size` values; each block of each row has one scale and, asymmetric, one
offset. Stored as ONNX Runtime's MatMulNBits takes it (with its default zero point):

    codes    uint8 [N, K / block_size, block_size * bits / 8]  unsigned codes, packed low
             nibble first along K when bits == 4
    scales   bundle dtype [N, K / block_size]
    offsets  bundle dtype [K / block_size, N], asymmetric with a float offset only (transposed:
             the right side of the small MatMul that adds them, so no runtime transposes them)

    W[n, k] = (code[n, k] - 2^(bits-1)) * scale[n, b] + offset[b, n],   b = k / block_size

Asymmetric with an integer zero point (`integer_zero_point`), MatMulNBits' own zero-point
input instead of offsets (its packed CPU kernel takes uint8 zero points; float ones run
unpacked):

    zero_points  uint8 [N, ceil(K / block_size * bits / 8)], packed like the codes (low nibble
                 first, the last byte's high nibble 0 for an odd count); GatherBlockQuantized
                 reads the same tensor

    W[n, k] = (code[n, k] - zero_point[n, b]) * scale[n, b]

The `portable` and `tensorrt` targets use layout "DequantizeLinear" instead: the weight
transposed, as the MatMul reads it, and the codes signed (TensorRT's dequantize accepts only
zero zero-points), so blocked DequantizeLinear (opset 21, axis 0) feeds MatMul directly:

    codes    int4/int8 [K, N] two's complement code - 2^(bits-1) (the unsigned code with its top
             bit flipped); int4 packed two per byte along N, low nibble first (ONNX's packing)
    scales, offsets  bundle dtype [K / block_size, N]

    W[n, k] = code[k, n] * scale[b, n] + offset[b, n]

(an integer zero point is stored there as the offset (2^(bits-1) - zero_point) * scale).

Symmetric blocks (no offset) put the block's largest magnitude on the code 0 (llama.cpp's
q4_0/q8_0 rule: scale = that signed value / -2^(bits-1)), so all 2^bits codes are used and
that value is exact. Asymmetric blocks map [min, max] onto [0, 2^bits - 1] exactly: scale =
(max - min) / (2^bits - 1), offset = min + 2^(bits-1) * scale (llama.cpp's q4_1 grid). The
offset is a float, not an integer zero point: an integer zero point forces a code onto 0.0,
which costs up to half a step of the grid in every block (see README for the measurement).
An integer zero point maps [min(min, 0), max(max, 0)] onto the codes with 0 on a code (ONNX
Runtime's and onnxruntime-genai's quantizers' rule). Codes are chosen against the stored
(rounded) scale and offset.

`search` (an error-minimising scale and clip search, llama.cpp's make_qx_quants /
make_qkx2_quants idea): besides the min/max grid, each block tries SEARCH_STEPS grids whose
step is slightly finer or coarser (clipping the extremes, or leaving room), fits the scale (and
offset) to that grid's codes by weighted least squares, re-codes against the stored values, and
keeps whichever grid has the smallest weighted squared error: never worse than min/max, per
block. Each weight counts rms(block) + |w| (llama.cpp's make_qkx2_quants weighting): an
unweighted search trades the few large weights for the many small ones, which lowers the error
and raises perplexity (measured: docs/quantization.md). The layout is the same; only the
chosen values differ. numpy only: the exporter
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
    search: bool = False  # how the values were chosen (module docstring); unpacking ignores it
    integer_zero_point: bool = False  # asymmetric only: a uint8 zero point instead of a float offset

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric, "layout": self.layout,
                "search": self.search, "integer_zero_point": self.integer_zero_point}

    @classmethod
    def from_dict(cls, record: dict) -> "Scheme":
        """The scheme of a quantized weight's manifest record (which holds to_dict()'s fields)."""
        return cls(record["bits"], record["block_size"], record["symmetric"], record["layout"], record["search"],
                   record["integer_zero_point"])

    @property
    def shift(self) -> str | None:
        """The stored role that moves the grid off zero: None (symmetric), "offsets" or "zero_points"."""
        if self.symmetric:
            return None
        return "zero_points" if self.integer_zero_point and self.layout == MATMULNBITS else "offsets"


# A quantized weight's stored tensors, by role ("rows": the codes' bytes seen as a 2-D table).
ROLES = ("codes", "scales", "offsets", "zero_points", "rows")


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized checkpoint weight in the manifest: its scheme, its [N, K] shape and the
    weights.bin names of its stored tensors by role (None where it has no such tensor)."""
    scheme: Scheme
    shape: tuple[int, int]
    codes: str
    scales: str
    offsets: str | None = None
    zero_points: str | None = None
    rows: str | None = None

    @property
    def stored(self) -> list[str]:
        """weights.bin names of every stored tensor of this weight."""
        return [name for name in (getattr(self, role) for role in ROLES) if name]

    def to_dict(self) -> dict:  # in the key order bundles have always had
        return {**self.scheme.to_dict(), "offsets": self.offsets, "zero_points": self.zero_points, "rows": self.rows,
                "codes": self.codes, "scales": self.scales, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, record: dict, name: str, where: str) -> "QuantizedWeight":
        if not (record.get("bits") in (4, 8) and type(record.get("block_size")) is int and record["block_size"] > 0
                and isinstance(record.get("symmetric"), bool) and record.get("layout") in LAYOUTS
                and isinstance(record.get("search"), bool) and isinstance(record.get("integer_zero_point"), bool)
                and bool(record.get("offsets") or record.get("zero_points")) != record["symmetric"]):
            raise LLMExportError(f"{where}: quantized weight {name!r} has a malformed scheme; re-export the bundle")
        shape = record["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
            raise LLMExportError(f"{where}: quantized weight {name!r} has shape {shape!r}; re-export the bundle")
        return cls(Scheme.from_dict(record), tuple(shape), record["codes"], record["scales"], record.get("offsets"),
                   record.get("zero_points"), record.get("rows"))


@dataclass(frozen=True)
class Quantization:
    """The manifest's `quantization` record: the export's settings and each quantized weight."""
    method: str
    accuracy_level: int
    layout: str
    tensors: dict[str, QuantizedWeight]

    def to_dict(self) -> dict:
        return {"method": self.method, "accuracy_level": self.accuracy_level, "layout": self.layout,
                "tensors": {name: w.to_dict() for name, w in self.tensors.items()}}

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "Quantization":
        if not isinstance(record["tensors"], dict):
            raise LLMExportError(f"{where}: quantization record is malformed; re-export the bundle")
        return cls(record["method"], record["accuracy_level"], record["layout"],
                   {name: QuantizedWeight.from_dict(r, name, where) for name, r in record["tensors"].items()})


def check_block(block_size: int, k: int, name: str) -> None:
    """MatMulNBits needs a power-of-two block of at least 16 that divides the row."""
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        raise LLMExportError(f"--quant-block {block_size} must be a power of two >= {MIN_BLOCK} (e.g. 32, 64, 128)")
    if block_size > k or k % block_size:
        raise LLMExportError(f"--quant-block {block_size} does not divide the {k} inputs of {name}; choose a "
                             f"power of two that divides {k}")


CHUNK_ELEMENTS = 1 << 20  # rows are packed this many weights at a time: temporaries stay in cache


def pack(w: np.ndarray, scheme: Scheme, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, and offsets, zero points or None: the tensor of role scheme.shift) of a
    float [N, K] weight."""
    n, k = w.shape
    blocks = k // scheme.block_size
    codes = np.empty((n, blocks, scheme.block_size), np.uint8)
    scale = np.empty((n, blocks), scale_dtype)
    offset = None if scheme.symmetric else np.empty((n, blocks), np.uint8 if scheme.integer_zero_point else scale_dtype)
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
    half = 2 ** (scheme.bits - 1)
    if scheme.shift == "zero_points":  # [N, blocks], packed like the codes
        if scheme.bits == 4:
            offset = _pack_nibbles(np.concatenate([offset, np.zeros((n, blocks % 2), np.uint8)], axis=1))
    elif offset is not None:
        if scheme.integer_zero_point:  # the DequantizeLinear layout stores it as a float offset
            offset = ((half - offset.astype(np.float32)) * scale.astype(np.float32)).astype(scale_dtype)
        offset = offset.T.copy()  # stored [K/block, N]: the right side of the MatMul that adds them
    if scheme.layout == DEQUANTIZE:  # signed [K, N]: two's complement of code - half is the top bit flipped
        codes = np.ascontiguousarray((codes ^ np.uint8(half)).reshape(n, k).T)
        scale = scale.T.copy()
    return (_pack_nibbles(codes) if scheme.bits == 4 else codes), scale, offset


SEARCH_STEPS = 20  # grids tried per block besides min/max (llama.cpp's make_qkx2_quants tries 21)


def _quantize(blocks: np.ndarray, scheme: Scheme, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unsigned codes, scales and offsets (None: symmetric) of float32 [rows, K/block, block]."""
    levels, half = 2**scheme.bits - 1, 2 ** (scheme.bits - 1)
    if scheme.symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale, offset = (extreme / -half).astype(scale_dtype), None
    elif scheme.integer_zero_point:  # the returned "offset" is the uint8 zero point
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = ((hi - lo) / levels).astype(scale_dtype)
        offset = _zero_point(lo, scale, levels)
    else:
        lo, hi = blocks.min(-1), blocks.max(-1)
        scale = ((hi - lo) / levels).astype(scale_dtype)  # rounded first: codes fit the stored values
        offset = (lo + half * scale.astype(np.float32)).astype(scale_dtype)
    codes = _codes(blocks, scale, _as_offset(offset, scale, scheme), levels, half)
    if scheme.search:
        codes = _search(blocks, scheme, scale_dtype, codes, scale, offset)
    return codes.astype(np.uint8), scale, offset


def _zero_point(lo, scale, levels: int) -> np.ndarray:
    """uint8 zero points putting `lo` on code 0 as near as an integer can."""
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.rint(-lo / scale.astype(np.float32))
    return np.clip(np.nan_to_num(zp), 0, levels).astype(np.uint8)


def _as_offset(offset, scale, scheme: Scheme):
    """The float32 offset of the W = (code - half) * scale + offset form (an integer zero point's
    equivalent, exact up to float rounding), or None."""
    if offset is None or not scheme.integer_zero_point:
        return offset
    return (2 ** (scheme.bits - 1) - offset.astype(np.float32)) * scale.astype(np.float32)


def _codes(blocks, scale, offset, levels: int, half: int) -> np.ndarray:
    """Float32 unsigned codes of `blocks` on the grid of the stored scale and offset."""
    base = 0.0 if offset is None else offset.astype(np.float32)[..., None]
    inverse = (1 / np.where(scale != 0, scale, 1).astype(np.float32))[..., None]
    values = np.subtract(blocks, base)
    values *= inverse
    values += half
    np.rint(values, out=values)  # half to even; + half first is the same: half is an integer
    return np.clip(values, 0, levels, out=values)


def importance(blocks: np.ndarray) -> np.ndarray:
    """The search's weight of each value of float32 [.., block] blocks: rms(block) + |value|."""
    return np.sqrt(np.square(blocks).mean(-1, keepdims=True)) + np.abs(blocks)


def _error(blocks, codes, scale, offset, half: int, weight) -> np.ndarray:
    """Weighted squared error per block of the weights `codes` stand for."""
    w = (codes - half) * scale.astype(np.float32)[..., None]
    if offset is not None:
        w += offset.astype(np.float32)[..., None]
    return (weight * np.square(w - blocks)).sum(-1)


def _search(blocks, scheme: Scheme, scale_dtype, codes, scale, offset) -> np.ndarray:
    """Per block, the grid of least weighted squared error among min/max's (given, updated in
    place with `scale` and `offset`) and SEARCH_STEPS grids fitted by weighted least squares;
    returns the codes."""
    levels, half = 2**scheme.bits - 1, 2 ** (scheme.bits - 1)
    weight = importance(blocks)
    best = _error(blocks, codes, scale, _as_offset(offset, scale, scheme), half, weight)
    n = weight.sum(-1)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    if scheme.integer_zero_point:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    if scheme.symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    for i in range(SEARCH_STEPS):
        stretch = 1 + 0.1 * (i - SEARCH_STEPS // 2) / half  # the grid's step x 1/stretch
        with np.errstate(divide="ignore", invalid="ignore"):
            if scheme.symmetric:  # codes q - half in [-half, half - 1], the extreme near -half
                q = np.clip(np.rint(blocks * (-half * stretch / extreme)), -half, half - 1)
                s = (weight * blocks * q).sum(-1) / (weight * np.square(q)).sum(-1)  # least squares: w ~ s q
                s_new, o_new = s.astype(scale_dtype), None
            elif scheme.integer_zero_point:  # a finer or coarser step, its zero point, then w ~ s (q - zp)
                zp = _zero_point(lo[..., 0], ((hi - lo)[..., 0] / (levels * stretch)).astype(scale_dtype), levels)
                q = np.clip(np.rint(blocks * (levels * stretch / (hi - lo)) + zp[..., None]), 0, levels)
                q -= zp[..., None]
                s = (weight * blocks * q).sum(-1) / (weight * np.square(q)).sum(-1)
                s_new, o_new = s.astype(scale_dtype), zp
            else:  # codes in [0, levels] over [lo, hi], then w ~ s q + m by least squares
                q = np.clip(np.rint((blocks - lo) * (levels * stretch / (hi - lo))), 0, levels)
                wq, wx = weight * q, weight * blocks
                sq, sx, sqq, sqx = wq.sum(-1), wx.sum(-1), (wq * q).sum(-1), (wq * blocks).sum(-1)
                det = n * sqq - sq * sq
                s = (n * sqx - sq * sx) / det
                m = (sqq * sx - sq * sqx) / det
                s_new, o_new = s.astype(scale_dtype), (m + half * s).astype(scale_dtype)
        valid = np.isfinite(s_new.astype(np.float32))
        if scheme.integer_zero_point:  # a zero point's grid needs a positive step
            valid &= s_new.astype(np.float32) > 0
        if o_new is not None:
            valid &= np.isfinite(o_new.astype(np.float32))
        if not valid.any():
            continue
        s_new = np.where(valid, s_new, scale)
        o_new = None if o_new is None else np.where(valid, o_new, offset)
        o_float = _as_offset(o_new, s_new, scheme)
        c = _codes(blocks, s_new, o_float, levels, half)
        error = _error(blocks, c, s_new, o_float, half, weight)
        better = valid & (error < best)
        best = np.where(better, error, best)
        codes[better] = c[better]
        scale[better] = s_new[better]
        if offset is not None:
            offset[better] = o_new[better]
    return codes


def unpack(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, scheme: Scheme,
           shape: tuple[int, int]) -> np.ndarray:
    """The float32 [N, K] weight the packed tensors stand for (`offsets`: the scheme.shift tensor)."""
    n, k = shape
    blocks = k // scheme.block_size
    if scheme.shift == "zero_points":
        q = _unpack_nibbles(codes, scheme.block_size) if scheme.bits == 4 else codes
        zp = _unpack_nibbles(offsets, blocks) if scheme.bits == 4 else offsets
        w = (q.reshape(n, blocks, scheme.block_size).astype(np.float32) - zp[..., None]) \
            * scales.astype(np.float32)[..., None]
        return w.reshape(n, k)
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
    if scheme.shift == "zero_points":
        out["zero_points"] = (n, -(-blocks * scheme.bits // 8))
    elif scheme.shift == "offsets":
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
