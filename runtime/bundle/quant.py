"""Block-wise weight-only quantization: the packed layout a bundle stores, packing and unpacking.

A linear weight W of shape [N, K] (out, in: the checkpoint's layout) is cut along K into
blocks of `block_size` values; each block of each row has one scale (and, asymmetric, one
zero point). Stored as ONNX Runtime's MatMulNBits takes it:

    codes        uint8 [N, K / block_size, block_size * bits / 8]  unsigned codes, packed
                 low nibble first along K when bits == 4
    scales       bundle dtype [N, K / block_size]
    zero_points  uint8, asymmetric only: [N, K / block_size] for 8 bits, for 4 bits two per
                 byte (low nibble first) [N, ceil(K / block_size / 2)]

    W[n, k] = (code[n, k] - zero_point[n, k / block_size]) * scale[n, k / block_size]

Symmetric blocks have no stored zero point: it is 2^(bits-1) (8 or 128), MatMulNBits' default,
and the codes span [1, 2^bits - 1] around it (scale = max |w| / (2^(bits-1) - 1)), so the
block's largest magnitude is exact and the range is the same on both sides. Asymmetric
blocks map [min(w, 0), max(w, 0)] onto [0, 2^bits - 1]. numpy only: the exporter packs with
it and every reader (the torch reference, C hosts following README) unpacks the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmexport import LLMExportError

BITS = {"int8": 8, "int4": 4}
MIN_BLOCK = 16  # MatMulNBits' smallest block


@dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int
    symmetric: bool = True

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, record: dict) -> "Scheme":
        """The scheme of a manifest's `quantization` record (which holds to_dict()'s fields)."""
        return cls(record["bits"], record["block_size"], record["symmetric"])


# A quantized weight's stored tensors, by role ("rows": the codes' bytes seen as a 2-D table).
ROLES = ("codes", "scales", "zero_points", "rows")


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


def pack(w: np.ndarray, scheme: Scheme, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, zero_points or None) of a float [N, K] weight."""
    n, k = w.shape
    blocks = w.astype(np.float32).reshape(n, k // scheme.block_size, scheme.block_size)
    levels = 2**scheme.bits - 1
    if scheme.symmetric:
        half = 2 ** (scheme.bits - 1)
        scale = np.abs(blocks).max(-1) / (half - 1)
        zero = np.full(scale.shape, half, dtype=np.float32)
    else:
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = (hi - lo) / levels
        zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1)), 0, levels)
    scale = scale.astype(scale_dtype)  # round the scale first: codes are chosen for the stored scale
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    codes = np.clip(np.round(blocks / safe[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    zero_points = None if scheme.symmetric else _pack_nibbles(zero.astype(np.uint8)) if scheme.bits == 4 \
        else zero.astype(np.uint8)
    return (_pack_nibbles(codes) if scheme.bits == 4 else codes), scale, zero_points


def unpack(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, scheme: Scheme,
           shape: tuple[int, int]) -> np.ndarray:
    """The float32 [N, K] weight the packed tensors stand for."""
    n, k = shape
    blocks = k // scheme.block_size
    q = _unpack_nibbles(codes, scheme.block_size) if scheme.bits == 4 else codes
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (scheme.bits - 1), dtype=np.float32)
    elif scheme.bits == 4:
        zero = _unpack_nibbles(zero_points.reshape(n, 1, -1), 2 * zero_points.shape[-1])[:, 0, :blocks]
    else:
        zero = zero_points.reshape(n, blocks)
    w = (q.reshape(n, blocks, scheme.block_size).astype(np.float32) - zero.astype(np.float32)[..., None]) \
        * scales.astype(np.float32).reshape(n, blocks)[..., None]
    return w.reshape(n, k)


def shapes(n: int, k: int, scheme: Scheme) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors of an [N, K] weight, by role."""
    blocks = k // scheme.block_size
    out = {"codes": (n, blocks, scheme.block_size * scheme.bits // 8), "scales": (n, blocks)}
    if not scheme.symmetric:
        out["zero_points"] = (n, (blocks + 1) // 2) if scheme.bits == 4 else (n, blocks)
    return out


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into one byte each, the first of a pair in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]
