"""Weights: Hugging Face safetensors checkpoints (single or sharded) and seeded random presets.

A `ModelSource` is where a model comes from: a preset name (seeded random weights) or a
checkpoint directory in Hugging Face layout. It yields tensors one at a time, so neither the
loader nor the exporter ever holds a second copy of the model.

Our parameter names are transformers' (`model.layers.{i}.self_attn.q_proj.weight`, ...);
`expected_shapes` is the one explicit name map, and a checkpoint must match it exactly.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmexport import LLMExportError

from .config import ModelConfig, check_dtype, load_config
from .llama import LlamaModel
from .presets import PRESETS, get_preset

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Present in some checkpoints, never needed: recomputed rope frequencies.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_INIT_STD = 0.02  # transformers' initializer_range default
# Files beside the weights that a bundle keeps: the tokenizer, its config and chat template, the
# legacy special-token map and the generation defaults (Hugging Face layout).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
              "generation_config.json")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` must hold, by Hugging Face name."""
    e, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, e)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (q, e),
            p + "self_attn.k_proj.weight": (kv, e),
            p + "self_attn.v_proj.weight": (kv, e),
            p + "self_attn.o_proj.weight": (e, q),
            p + "post_attention_layernorm.weight": (e,),
            p + "mlp.gate_proj.weight": (i, e),
            p + "mlp.up_proj.weight": (i, e),
            p + "mlp.down_proj.weight": (e, i),
        }
        if config.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (e,)
    shapes["model.norm.weight"] = (e,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded float32 init of one tensor; depends only on (name, shape, seed), so it can stream."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed * 1_000_003) % 2**63)
    return torch.randn(shape, generator=g) * _INIT_STD


@dataclass(frozen=True)
class ModelSource:
    """A preset (random weights from `seed`) or a Hugging Face checkpoint directory."""

    name: str
    config: ModelConfig
    checkpoint_dir: Path | None = None
    seed: int = 0

    @property
    def tokenizer_file(self) -> Path | None:
        return self.side_files().get("tokenizer.json")

    def side_files(self) -> dict[str, Path]:
        """The checkpoint's tokenizer, chat and generation files that exist, by file name."""
        if not self.checkpoint_dir:
            return {}
        return {name: self.checkpoint_dir / name for name in SIDE_FILES if (self.checkpoint_dir / name).is_file()}

    def tensors(self, dtype: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor in `dtype`) for every expected tensor, one at a time."""
        torch_dtype = TORCH_DTYPES[check_dtype(dtype)]
        if self.checkpoint_dir is None:
            for name, shape in expected_shapes(self.config).items():
                yield name, random_tensor(name, shape, self.seed).to(torch_dtype)
            return
        expected = expected_shapes(self.config)
        for path, names in _shards(self.checkpoint_dir).items():
            for name, tensor in _read_safetensors(path, [n for n in names if n in expected]):
                yield name, tensor.to(torch_dtype)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_safetensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one safetensors file, each read into its own buffer with plain
    reads. Not memory-mapped: a mapping's touched pages count as the process's resident memory
    until the file is closed, so reading a 5 GB shard through one held 5 GB (llama-2-7b's
    sharded export peaked at 5.3 GiB); this way only the tensor being converted is resident.
    Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the data (offsets relative to its start)."""
    def corrupt(why: str) -> LLMExportError:
        return LLMExportError(f"cannot read {path}: {why}; the file is corrupt or truncated")

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
            raise corrupt("no safetensors header")
        try:
            header = json.loads(f.read(int.from_bytes(head, "little")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"unreadable header ({e})") from None
        base = 8 + int.from_bytes(head, "little")
        for name in names:
            entry = header.get(name)
            if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
                raise corrupt(f"{name} is missing or not a float tensor ({(entry or {}).get('dtype')})")
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
            want = math.prod(shape) * dtype.itemsize
            if end - begin != want or base + end > size:
                raise corrupt(f"{name}'s data ({end - begin} bytes at {begin}) does not fit its shape or the file")
            buffer, done = bytearray(want), 0
            view = memoryview(buffer)
            while done < want:  # one read returns at most ~2 GiB on Linux
                got = os.preadv(f.fileno(), [view[done:]], base + begin + done)
                if got <= 0:
                    raise corrupt(f"{name} is cut short")
                done += got
            yield name, (torch.frombuffer(buffer, dtype=dtype).reshape(shape) if want
                         else torch.empty(shape, dtype=dtype))


def open_source(model: str | Path, seed: int = 0) -> ModelSource:
    """Resolve a preset name or a checkpoint directory, validating the checkpoint's tensors."""
    path = Path(model)
    if str(model) in PRESETS and not path.is_dir():
        return ModelSource(str(model), get_preset(str(model)), None, seed)
    if not path.exists():
        get_preset(str(model))  # raises the "unknown preset" error, listing the presets
    if not path.is_dir():
        raise LLMExportError(f"{model} is not a directory; pass a preset name or a checkpoint directory")
    config = load_config(path)
    _check_checkpoint(path, config)
    return ModelSource(path.name, config, path, seed)


def _shards(checkpoint_dir: Path) -> dict[Path, list[str]]:
    """safetensors file -> the expected tensor names it holds (ignorable extras dropped)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LLMExportError(f"cannot read {index}: {e}") from None
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(checkpoint_dir / file, []).append(name)
    else:
        paths = sorted(checkpoint_dir.glob("*.safetensors"))
        if not paths:
            raise LLMExportError(
                f"no *.safetensors in {checkpoint_dir}; convert the checkpoint to safetensors "
                f"(transformers: save_pretrained(..., safe_serialization=True))"
            )
        files = {}
        for p in paths:
            try:
                with safe_open(p, framework="pt") as f:
                    files[p] = list(f.keys())
            except SafetensorError as e:
                raise LLMExportError(f"cannot read {p}: {e}; the file is corrupt or truncated") from None
    return {p: [n for n in names if not n.endswith(_IGNORABLE_SUFFIXES)] for p, names in files.items()}


def _check_checkpoint(checkpoint_dir: Path, config: ModelConfig) -> None:
    """Fail with one message listing every missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(config)
    found: dict[str, tuple[int, ...]] = {}
    for path, names in _shards(checkpoint_dir).items():
        if not path.is_file():
            raise LLMExportError(f"{path} is named in the index but missing; re-download the checkpoint")
        try:
            with safe_open(path, framework="pt") as f:
                for name in names:
                    found[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as e:
            raise LLMExportError(f"cannot read {path}: {e}; the file is corrupt or truncated") from None
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some writers store the tied copy too
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"unexpected {n}" for n in found if n not in expected]
    problems += [f"{n} has shape {list(found[n])}, expected {list(s)}"
                 for n, s in expected.items() if n in found and found[n] != s]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise LLMExportError(f"checkpoint {checkpoint_dir} does not match its config.json: {shown}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_model(model: str | Path | ModelSource, dtype: str = "float32", max_seq_len: int | None = None,
               seed: int = 0, device: str = "cpu") -> LlamaModel:
    """Build the reference model on `meta`, then stream its weights in (converted to `dtype`).

    `model` is a preset name, a checkpoint directory, or any source with `config` and
    `tensors(dtype)` (ModelSource, or runtime.backends.torch.BundleSource).
    """
    source = open_source(model, seed) if isinstance(model, (str, Path)) else model
    torch_dtype = TORCH_DTYPES[check_dtype(dtype)]
    with torch.device("meta"):
        net = LlamaModel(source.config, max_seq_len)
    for name, tensor in source.tensors(dtype):
        _assign(net, name, tensor.to(device))
    if source.config.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    half = source.config.head_dim // 2
    net.rope_cos = torch.empty(net.max_seq_len, half, dtype=torch_dtype, device=device)
    net.rope_sin = torch.empty(net.max_seq_len, half, dtype=torch_dtype, device=device)
    net.reset_rope()
    return net.eval()


def save_pretrained(model: LlamaModel, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors in Hugging Face layout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    hf = model.config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tensors = {n: t.contiguous() for n, t in model.state_dict().items() if n in expected_shapes(model.config)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
