"""The KV cache layout, the one place it is spelled: the model, the tracer, the manifest and
every backend read it from here.

Each layer has one key and one value buffer of shape (B, Hkv, T, D): rows (batch), key/value
heads, slots (max_seq_len), head_dim; AXES names them in the manifest. Wherever the buffers
stand in one flat list (graph inputs and outputs, a backend's buffers, `cache_arrays`), they are
interleaved: layer 0's key, layer 0's value, layer 1's key, ... (`interleave`, `split`). Graph
inputs are past_key_values.{i}.key/.value and outputs present.{i}.key/.value (names.py); each
output aliases its input. An `in_place` graph (GroupQueryAttention: the `ort` target) writes
its new slots into the input's buffer, so past and present are bound to one buffer; the others
return whole new tensors, so a runtime binds present to a second buffer.

Standard library only, so the torch model can import it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import names as io

AXES = ("batch", "kv_heads", "max_seq_len", "head_dim")  # the manifest's cache.layout
T = TypeVar("T")


def interleave(keys: Iterable[T], values: Iterable[T]) -> list[T]:
    """One flat list from per-layer keys and values: k0, v0, k1, v1, ..."""
    return [x for pair in zip(keys, values, strict=True) for x in pair]


def split(flat: Sequence[T]) -> tuple[list[T], list[T]]:
    """(keys, values) of a flat list in the layout's order."""
    return list(flat[0::2]), list(flat[1::2])


def cache_inputs(num_layers: int) -> list[str]:
    return interleave(map(io.past_key, range(num_layers)), map(io.past_value, range(num_layers)))


def cache_outputs(num_layers: int) -> list[str]:
    return interleave(map(io.present_key, range(num_layers)), map(io.present_value, range(num_layers)))


def graph_inputs(num_layers: int, phase: str) -> list[str]:
    """Every graph's inputs in order: the token inputs, then the caches (genai.onnx takes
    onnxruntime-genai's token inputs: ids and the attention mask)."""
    if phase == io.GENAI:
        return [io.INPUT_IDS, io.ATTENTION_MASK, *cache_inputs(num_layers)]
    picked = [io.LOGITS_INDEX] if phase == io.PREFILL else []
    return [io.INPUT_IDS, io.POSITION_IDS, io.SEQ_LENS, *picked, *cache_inputs(num_layers)]


def graph_outputs(num_layers: int) -> list[str]:
    return [io.LOGITS, *cache_outputs(num_layers)]


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    kv_heads: int
    max_seq_len: int  # slots per row
    head_dim: int
    in_place: bool = True

    @classmethod
    def of(cls, config, max_seq_len: int, in_place: bool = True) -> "KVLayout":
        """The layout for a model config (anything with num_layers, num_kv_heads, head_dim:
        model.config.ModelConfig)."""
        return cls(config.num_layers, config.num_kv_heads, max_seq_len, config.head_dim, in_place)

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return batch, self.kv_heads, self.max_seq_len, self.head_dim  # (B, Hkv, T, D)

    @property
    def row_elements(self) -> int:
        """Elements of one row of one buffer (Hkv * T * D): rows are contiguous."""
        return self.kv_heads * self.max_seq_len * self.head_dim

    @property
    def buffers(self) -> int:
        return 2 * self.num_layers

    @property
    def inputs(self) -> list[str]:
        return cache_inputs(self.num_layers)

    @property
    def outputs(self) -> list[str]:
        return cache_outputs(self.num_layers)

    @property
    def aliases(self) -> dict[str, str]:
        """Each present output -> the past input it updates (bind both to one buffer when in place)."""
        return dict(zip(self.outputs, self.inputs))

    def to_dict(self, dtype: str) -> dict:
        """The manifest's `cache` record (its dtype is the bundle's)."""
        return {"layout": list(AXES), "shape": [io.BATCH, self.kv_heads, self.max_seq_len, self.head_dim],
                "dtype": dtype, "num_layers": self.num_layers, "in_place": self.in_place}

    @classmethod
    def from_dict(cls, record: dict) -> "KVLayout":
        """From a manifest `cache` record that Manifest.from_dict has checked."""
        _, heads, slots, dim = record["shape"]
        return cls(int(record["num_layers"]), int(heads), int(slots), int(dim), bool(record["in_place"]))
