"""The static KV cache: one key and one value buffer per layer, allocated once.

Buffers are (B, Hkv, T, D) as the bundle format's KV layout (runtime/bundle/kv.py) says:
batch, key/value heads, capacity (max_seq_len), head_dim. The model never owns or grows them;
it returns updated tensors which `update` takes back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmexport.runtime.bundle.kv import KVLayout

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.layout = KVLayout.of(config, max_seq_len)
        shape = self.layout.shape(batch)
        self.k: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def max_seq_len(self) -> int:
        return self.layout.max_seq_len

    def update(self, k: list[Tensor], v: list[Tensor]) -> None:
        """Take the caches a forward returned."""
        self.k, self.v = list(k), list(v)
