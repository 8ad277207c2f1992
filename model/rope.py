"""Rotary position embedding tables (default, linear and llama3 frequency scaling).

The tables are computed in float32 exactly as transformers does (positions times inverse
frequencies) and hold the half-width cos/sin, `(T, D/2)`, the layout ONNX Runtime's fused
attention takes as `cos_cache` / `sin_cache`.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies after the config's rope scaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s.type == "linear":
        return inv / s.factor
    if s.type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_tables(config: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (T, D/2) float32 for positions 0..T-1."""
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inverse_frequencies(config)[None, :]
    return freqs.cos(), freqs.sin()
