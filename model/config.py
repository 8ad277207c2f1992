"""Model configuration: one frozen dataclass, read from a Hugging Face `config.json` or a preset.

Every key that changes the math is mapped explicitly; values we do not implement are
rejected with the field's name instead of being silently ignored. Both the transformers 4
spelling (`rope_theta`, `rope_scaling`) and the transformers 5 one (`rope_parameters`,
`layer_types`) are read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llmexport import LLMExportError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "float16", "bfloat16")

# Keys that carry no information for inference (training knobs, bookkeeping, generic
# transformers PretrainedConfig fields).
_IGNORED_KEYS = {
    "architectures", "attention_dropout", "initializer_range", "use_cache", "transformers_version",
    "torch_dtype", "dtype", "_name_or_path", "_model_name_or_path", "pad_token_id", "unk_token_id",
    "sep_token_id", "decoder_start_token_id", "model_type", "output_attentions", "output_hidden_states",
    "return_dict", "tokenizer_class", "auto_map", "use_return_dict", "is_decoder", "chunk_size_feed_forward",
    "_attn_implementation_autoset", "_attn_implementation", "id2label", "label2id", "problem_type",
    "max_window_layers", "use_sliding_window", "bos_token_id", "eos_token_id", "_from_model_config",
    "finetuning_task", "task_specific_params", "prefix", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_encoder_decoder", "is_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "keys_to_ignore_at_inference", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "cache_implementation", "sliding_window_pattern",
}
# Keys that change the math when set; accepted only with the neutral value shown (what a
# plain Llama/Qwen2/Mistral has). Anything else is rejected with the key named.
_NEUTRAL_KEYS: dict[str, Any] = {
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": None, "logits_scaling": 1.0,
    "query_pre_attn_scalar": None, "use_qk_norm": False, "qk_layernorm": False, "use_mrope": False,
    "mlp_bias": False, "pretraining_tp": 1, "hidden_act": "silu", "quantization_config": None,
    "partial_rotary_factor": 1.0, "rope_interleaved": False, "no_rope_layers": None,
}
# Keys config_from_hf maps onto ModelConfig.
_MAPPED_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "head_dim", "attention_bias", "tie_word_embeddings", "sliding_window", "layer_types",
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `type` is one of SUPPORTED_ROPE_TYPES."""

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    head_dim_override: int | None = None  # HF `head_dim` when it is not hidden / heads
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # tokens a query may see, itself included
    sliding_window_layers: tuple[int, ...] = ()  # which layers use the window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint declares

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise LLMExportError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; fix config.json"
            )
        if self.head_dim % 2:
            raise LLMExportError(f"head_dim={self.head_dim} must be even for RoPE; fix config.json")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int:
        """Sliding window of `layer` in tokens, 0 for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers and self.sliding_window else 0

    def num_parameters(self) -> int:
        d, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        per_layer = attn + 3 * d * i + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    def weight_bytes(self, dtype: str) -> int:
        return self.num_parameters() * dtype_bytes(dtype)

    def kv_cache_bytes(self, batch: int, max_seq_len: int, dtype: str) -> int:
        return 2 * self.num_layers * batch * self.num_kv_heads * max_seq_len * self.head_dim * dtype_bytes(dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (what bundles store in manifest.json)."""
        data = dict(data)
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["sliding_window_layers"] = tuple(data["sliding_window_layers"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-readable config.json (transformers 4 spelling, which 5 also reads)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling.type == "default" else _rope_scaling_dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        if self.model_type in ("qwen2", "mistral"):
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = bool(self.sliding_window_layers)
            out["max_window_layers"] = min(self.sliding_window_layers, default=self.num_layers)
        return out


def dtype_bytes(dtype: str) -> int:
    check_dtype(dtype)
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise LLMExportError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def _rope_scaling_dict(r: RopeScaling) -> dict[str, Any]:
    if r.type == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    return {
        "rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
    }


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise LLMExportError(
            f"config.json rope_scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise LLMExportError("config.json partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, RopeScaling()
    try:
        if rope_type == "linear":
            return theta, RopeScaling("linear", float(scaling["factor"]))
        return theta, RopeScaling(
            "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise LLMExportError(f"config.json rope_scaling type {rope_type!r} lacks field {e.args[0]!r}") from None


def _sliding_window(hf: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    window = hf.get("sliding_window")
    if hf["model_type"] == "llama" or not window:
        return None, ()
    if "layer_types" in hf:  # transformers 5 spells out each layer
        layers = tuple(i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention")
    elif hf["model_type"] == "qwen2":
        first = int(hf.get("max_window_layers", num_layers))
        layers = tuple(range(first, num_layers)) if hf.get("use_sliding_window") else ()
    else:  # mistral: every layer
        layers = tuple(range(num_layers))
    return (int(window) if layers else None), layers


def _check_keys(hf: dict[str, Any]) -> None:
    """Every key is mapped, ignorable, or a math-changing key at its neutral value."""
    for key, value in hf.items():
        if key in _MAPPED_KEYS or key in _IGNORED_KEYS:
            continue
        if key in _NEUTRAL_KEYS:
            neutral = _NEUTRAL_KEYS[key]
            if value == neutral or (value is None and neutral in (False, 1, 1.0)) or (value is False and neutral is None):
                continue
            raise LLMExportError(f"config.json {key}={value!r} changes the model's math and is not supported "
                                 f"(supported: {neutral!r}); this checkpoint cannot be exported")
        raise LLMExportError(f"config.json has key {key!r}, unknown to llmexport, which may change the model's "
                             f"math; if it does not affect inference, remove it from config.json")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face config.json dict onto ModelConfig, rejecting what we cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LLMExportError(
            f"config.json model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_keys(hf)
    try:
        num_layers = int(hf["num_hidden_layers"])
        heads = int(hf["num_attention_heads"])
        theta, scaling = _rope(hf)
        window, window_layers = _sliding_window(hf, num_layers)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim")
        attention_bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            head_dim_override=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_window_layers=window_layers,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise LLMExportError(f"config.json lacks required field {e.args[0]!r}") from None


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `<checkpoint_dir>/config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise LLMExportError(f"no config.json in {checkpoint_dir}; pass a Hugging Face checkpoint directory or a preset name")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMExportError(f"cannot read {path}: {e}") from None
    return config_from_hf(hf)


def with_overrides(config: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy with some fields changed (configs are frozen)."""
    return replace(config, **changes)
