"""Named presets: the published shapes of real models (random weights) and tiny test models.

Shapes are copied from each model's published config.json. Presets have no checkpoint:
their weights are seeded random (see weights.random_weights).
"""

from __future__ import annotations

from llmexport import LLMExportError

from .config import ModelConfig, RopeScaling

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_ids=(2,), torch_dtype="float16")
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_ids=(128001,), torch_dtype="bfloat16")
_QWEN2 = dict(model_type="qwen2", qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
              bos_token_id=151643, eos_token_ids=(151643,), torch_dtype="bfloat16")
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             max_position_embeddings=256, torch_dtype="float32", bos_token_id=1, eos_token_ids=(2,))

PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(**_LLAMA2, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32),
    "llama-2-13b": ModelConfig(**_LLAMA2, hidden_size=5120, intermediate_size=13824, num_layers=40,
                               num_heads=40, num_kv_heads=40),
    "llama-3-8b": ModelConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, max_position_embeddings=8192),
    "llama-3.2-1b": ModelConfig(**_LLAMA3, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, max_position_embeddings=131072,
                                rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                                tie_word_embeddings=True),
    "tinyllama-1.1b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2048,
                                  intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                                  max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                                  eos_token_ids=(2,), torch_dtype="float32"),
    "qwen2-0.5b": ModelConfig(**_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_layers=24, num_heads=14, num_kv_heads=2, max_position_embeddings=32768,
                              tie_word_embeddings=True),
    "qwen2-7b": ModelConfig(**_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=28, num_heads=28, num_kv_heads=4, max_position_embeddings=131072),
    "qwen2.5-7b": ModelConfig(**_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, max_position_embeddings=131072),
    # v0.1: the one with a 4096-token sliding window on every layer.
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                              max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                              sliding_window_layers=tuple(range(32)), bos_token_id=1, eos_token_ids=(2,),
                              torch_dtype="bfloat16"),
    # Tiny test models: 2 layers, hidden 64, head_dim 16 (ORT's fused attention needs a multiple of 16).
    "tiny-llama": ModelConfig(model_type="llama", num_kv_heads=4, **_TINY),
    "tiny-llama3": ModelConfig(model_type="llama", num_kv_heads=2, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), **_TINY),
    "tiny-qwen2": ModelConfig(model_type="qwen2", num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, **_TINY),
    "tiny-mistral": ModelConfig(model_type="mistral", num_kv_heads=2, sliding_window=8,
                                sliding_window_layers=(0, 1), **_TINY),
}

DEFAULT_PRESET = "tiny-llama"


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise LLMExportError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a checkpoint directory"
        ) from None
